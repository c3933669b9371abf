"""The compiled loops behind :mod:`loomx.backends.numba_kernels` (imports numba).

Imported on the first call of a numba kernel, never by ``import loomx``. Each loop is compiled
for the dtypes it first meets and cached on disk (``cache=True``), releases the GIL while it
runs (``nogil=True``, so the threads of ``BatchParallel`` overlap) and keeps IEEE semantics
(no ``fastmath``): every value is computed with the operations of the array-API reference in
the same order, so the results are the same to the bit.

Each inner loop writes one output stream. LLVM vectorises such loops after a runtime check
that the arrays do not overlap; a loop that stores into several blocks of one array is left
scalar, which was measured 3.5× slower.
"""

from __future__ import annotations

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")


@_jit
def lstm_gates(u, c_prev, s):
    """``u = tanh(pre) [B, 4H]`` (blocks i, f, o, g; i, f, o of half the pre-activation) and
    ``c_prev [B, H]`` → ``s[0..4] = i, f, g, o, c`` with ``σ = ½·u + ½`` and
    ``c = f·c_prev + i·g``. ``s`` is ``[≥5, B, H]``."""
    rows, width = c_prev.shape
    half = u.dtype.type(0.5)
    for b in range(rows):
        ur, cr = u[b], c_prev[b]
        i, f, g, o, c = s[0, b], s[1, b], s[2, b], s[3, b], s[4, b]
        for j in range(width):
            i[j] = half * ur[j] + half
        for j in range(width):
            f[j] = half * ur[width + j] + half
        for j in range(width):
            o[j] = half * ur[2 * width + j] + half
        for j in range(width):
            g[j] = ur[3 * width + j]
        for j in range(width):
            c[j] = f[j] * cr[j] + i[j] * g[j]


@_jit
def lstm_backward(i, f, g, o, c_prev, tc, dh, dc_next, has_next, out, dc_prev):
    """One LSTM step backwards: the saved ``[B, H]`` gates and states, ``dh`` and (when
    ``has_next``) ``dc_next`` → the pre-activation gradient ``out [B, 4H]`` (gate order
    i, f, g, o) and ``dc_prev [B, H]``."""
    rows, width = i.shape
    one = i.dtype.type(1.0)
    dc = np.empty(width, i.dtype)
    for b in range(rows):
        ir, fr, gr, orr, tr, dr, cr = i[b], f[b], g[b], o[b], tc[b], dh[b], c_prev[b]
        outr, dcp = out[b], dc_prev[b]
        for j in range(width):
            dc[j] = dr[j] * orr[j] * (one - tr[j] * tr[j])
        if has_next:
            nr = dc_next[b]
            for j in range(width):
                dc[j] = dc[j] + nr[j]
        for j in range(width):
            outr[j] = dc[j] * gr[j] * ir[j] * (one - ir[j])
        for j in range(width):
            outr[width + j] = dc[j] * cr[j] * fr[j] * (one - fr[j])
        for j in range(width):
            outr[2 * width + j] = dc[j] * ir[j] * (one - gr[j] * gr[j])
        for j in range(width):
            outr[3 * width + j] = dr[j] * tr[j] * orr[j] * (one - orr[j])
        for j in range(width):
            dcp[j] = dc[j] * fr[j]


@_jit
def relu_backward(z, dy, scale):
    """``dy ← dy·(scale where z > 0, else 0)`` in place over flat (1-D) ``z`` and ``dy``: the
    reference's ``dy * (astype(z > 0)·scale)``.

    Not :func:`relu_family_backward` with ``out=dy``: output and input then overlap, LLVM's
    runtime check sends the loop down its scalar path, and it took 42 against 13 µs on
    ``[256, 512]``."""
    zero = dy.dtype.type(0.0)
    for k in range(dy.shape[0]):
        dy[k] = dy[k] * (scale if z[k] > zero else zero)


@_jit
def relu_family_backward(z, dy, out, scale, slope):
    """``out = dy·(scale where z > 0, else slope)`` over flat (1-D) arrays: the ReLU family's
    derivative times ``dy`` (``slope`` 0 for ReLU; for a leaky one the reference's
    ``m + (1 - m)·slope`` is 1 or ``slope`` exactly)."""
    zero = dy.dtype.type(0.0)
    for k in range(dy.shape[0]):
        out[k] = dy[k] * (scale if z[k] > zero else slope)


@_jit
def sgd_update(w, g, lr, weight_decay):
    """``w ← w − lr·(g + weight_decay·w)`` in place over flat (1-D) arrays, in the reference's
    order of operations."""
    zero = w.dtype.type(0.0)
    for k in range(w.shape[0]):
        gk = g[k]
        if weight_decay != zero:
            gk = gk + weight_decay * w[k]
        w[k] = w[k] - lr * gk


@_jit
def bias_relu(x, bias, has_bias, scale, slope):
    """``x ← max(s·(x + b), slope·s·(x + b))`` in place over the rows of a 2-D ``x [R, N]``
    (``bias [N]`` when ``has_bias``; ``slope`` 0: ReLU) with the values of numpy's
    ``maximum``, signed zeros included. The tests on the flags are loop-invariant (LLVM hoists
    them)."""
    one, zero = x.dtype.type(1.0), x.dtype.type(0.0)
    for r in range(x.shape[0]):
        row = x[r]
        for j in range(row.shape[0]):
            v = row[j]
            if has_bias:
                v = v + bias[j]
            if scale != one:
                v = v * scale
            low = zero if slope == zero else v * slope
            # numpy's maximum: NaN propagates, and of two equal values (±0) the second
            row[j] = v if v > low or v != v else low


@_jit
def scatter_add_2d(out, cols, kh, kw, sh, sw, dh, dw, ph, pw):
    """Add ``cols [B, OH, OW, K, C]`` (windows of a ``kh × kw`` kernel, offsets row-major)
    into ``out [B, H, W, C]`` in place. Window positions are ``o·stride + k·dilation`` of the
    input padded by ``ph`` rows and ``pw`` columns in front; positions in the padding are
    skipped (``out`` is the unpadded input's gradient).

    Per image, kernel row ``ky`` outermost, then window row, kernel column ``kx``, window
    column: every position receives its windows' values in kernel-offset order, the order in
    which the reference adds them, so the sums are the same to the bit. Three passes over an
    image's windows (one per kernel row, each reading a third) keep them in cache; one pass
    over all offsets at once was 1.5 against 2.1 ms on the CNN benchmark's second
    convolution, but adds in another order.
    """
    batch, oh, ow = cols.shape[0], cols.shape[1], cols.shape[2]
    height, width, channels = out.shape[1], out.shape[2], cols.shape[4]
    for b in range(batch):
        ob, cb = out[b], cols[b]
        for ky in range(kh):
            for oy in range(oh):
                iy = oy * sh + ky * dh - ph
                if iy < 0 or iy >= height:
                    continue
                row, crow = ob[iy], cb[oy]
                for kx in range(kw):
                    j = ky * kw + kx
                    for ox in range(ow):
                        ix = ox * sw + kx * dw - pw
                        if ix < 0 or ix >= width:
                            continue
                        dst, src = row[ix], crow[ox, j]
                        for c in range(channels):
                            dst[c] += src[c]


@_jit
def im2col_2d(x, out, kh, kw, sh, sw, dh, dw, ph, pw):
    """Gather the windows of ``x [B, H, W, C]`` into ``out [B, OH, OW, K, C]``: window
    ``(oy, ox)``, offset ``(ky, kx)`` reads position ``o·stride + k·dilation`` of the input
    padded by ``ph`` rows and ``pw`` columns in front (zeros outside ``x``).

    Per window row, kernel offset by kernel offset, all the windows of the row: each offset
    reads one input row left to right. Window by window (all offsets of one window, then the
    next) was slower between the matrix products of the convolution's chunks, where the input
    is not in cache: 6.44 against 5.85 ms for the gathers and products of benchmark b's second
    convolution forward (in the whole training step the difference was within the noise)."""
    batch, oh, ow = out.shape[0], out.shape[1], out.shape[2]
    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    zero = out.dtype.type(0.0)
    for b in range(batch):
        xb, ob = x[b], out[b]
        for oy in range(oh):
            orow = ob[oy]
            for ky in range(kh):
                iy = oy * sh + ky * dh - ph
                inside = 0 <= iy < height
                for kx in range(kw):
                    j = ky * kw + kx
                    for ox in range(ow):
                        ix = ox * sw + kx * dw - pw
                        dst = orow[ox, j]
                        if inside and 0 <= ix < width:
                            src = xb[iy, ix]
                            for c in range(channels):
                                dst[c] = src[c]
                        else:
                            for c in range(channels):
                                dst[c] = zero


@_jit
def gru_gates(u, xw, hw, s):
    """``u = tanh(½·(xw + hw))`` over the r and z blocks ``[B, 2H]`` → ``s[0] = r``,
    ``s[1] = z`` (``½·u + ½``), ``s[3] = hn`` (the hidden side of the n gate, copied) and
    ``s[2] = xw_n + r·hn`` (the n gate before its ``tanh``). ``s`` is ``[≥4, B, H]``."""
    rows, width = s.shape[1], s.shape[2]
    half = u.dtype.type(0.5)
    for b in range(rows):
        ur, xr, hr = u[b], xw[b], hw[b]
        r, z, npre, hn = s[0, b], s[1, b], s[2, b], s[3, b]
        for j in range(width):
            r[j] = half * ur[j] + half
        for j in range(width):
            z[j] = half * ur[width + j] + half
        for j in range(width):
            hn[j] = hr[2 * width + j]
        for j in range(width):
            npre[j] = xr[2 * width + j] + r[j] * hn[j]


@_jit
def gru_output(z, n, h_prev, h):
    """``h = (1 − z)·n + z·h_prev`` over ``[B, H]`` arrays."""
    one = z.dtype.type(1.0)
    for b in range(z.shape[0]):
        zr, nr, pr, hr = z[b], n[b], h_prev[b], h[b]
        for j in range(zr.shape[0]):
            hr[j] = (one - zr[j]) * nr[j] + zr[j] * pr[j]


@_jit
def gru_backward(r, z, n, hn, h_prev, dh, dpx, dph, dhz):
    """One GRU step backwards: the saved ``[B, H]`` gates and state and ``dh`` → the
    input-side and hidden-side pre-activation gradients ``dpx``, ``dph [B, 3H]`` (blocks r, z,
    n) and ``dhz = dh·z``. Values shared by both buffers are computed twice, identically, so
    that every loop writes one stream."""
    rows, width = r.shape
    one = r.dtype.type(1.0)
    dn = np.empty(width, r.dtype)
    for b in range(rows):
        rr, zr, nr, hr, pr, dr = r[b], z[b], n[b], hn[b], h_prev[b], dh[b]
        px, ph, out = dpx[b], dph[b], dhz[b]
        for j in range(width):
            dn[j] = dr[j] * (one - zr[j]) * (one - nr[j] * nr[j])
        for j in range(width):
            px[j] = dn[j] * hr[j] * rr[j] * (one - rr[j])
        for j in range(width):
            ph[j] = dn[j] * hr[j] * rr[j] * (one - rr[j])
        for j in range(width):
            px[width + j] = dr[j] * (pr[j] - nr[j]) * zr[j] * (one - zr[j])
        for j in range(width):
            ph[width + j] = dr[j] * (pr[j] - nr[j]) * zr[j] * (one - zr[j])
        for j in range(width):
            px[2 * width + j] = dn[j]
        for j in range(width):
            ph[2 * width + j] = dn[j] * rr[j]
        for j in range(width):
            out[j] = dr[j] * zr[j]


@_jit
def silu_gate(t, g, u, h):
    """SwiGLU's gate over flat arrays: ``t = tanh(½·g)`` in, ``t ← σ(g) = ½·t + ½`` and
    ``h = g·σ(g)·u`` out."""
    half = t.dtype.type(0.5)
    for k in range(t.shape[0]):
        sk = half * t[k] + half
        t[k] = sk
        h[k] = g[k] * sk * u[k]


@_jit
def silu_gate_backward(g, u, s, dh, dg, du):
    """The gate's gradients over flat arrays: ``dg = dh·u·(s + g·s·(1 − s))``,
    ``du = dh·g·s`` (two output streams from distinct arrays: LLVM still vectorises this
    loop, and one pass reads the inputs once, 0.77 against 1.13 ms for two loops on
    ``[2048, 688]``)."""
    one = g.dtype.type(1.0)
    for k in range(g.shape[0]):
        dg[k] = dh[k] * u[k] * (s[k] + g[k] * s[k] * (one - s[k]))
        du[k] = dh[k] * g[k] * s[k]


@_jit
def max_pool_2d(x, y, idx, kh, kw, sh, sw, ph, pw):
    """Max pooling of ``x [B, H, W, C]`` (any strides) into ``y [B, OH, OW, C]``, padding
    ``ph``/``pw`` in front counting as ``-inf``, with the values of the reference: numpy's
    ``maximum`` over the window offsets in row-major order (NaN propagates). ``idx`` receives
    the first offset whose value equals the maximum, or ``kh·kw`` where none does (NaN)."""
    batch, oh, ow, channels = y.shape
    height, width = x.shape[1], x.shape[2]
    ninf = y.dtype.type(-np.inf)
    k = kh * kw
    for b in range(batch):
        for oy in range(oh):
            for ox in range(ow):
                m, ib = y[b, oy, ox], idx[b, oy, ox]
                for ky in range(kh):
                    iy = oy * sh + ky - ph
                    for kx in range(kw):
                        ix = ox * sw + kx - pw
                        inside = 0 <= iy < height and 0 <= ix < width
                        if ky == 0 and kx == 0:
                            if inside:
                                src = x[b, iy, ix]
                                for c in range(channels):
                                    m[c] = src[c]
                            else:
                                for c in range(channels):
                                    m[c] = ninf
                        elif inside:  # maximum(m, -inf) is m: padding changes nothing
                            src = x[b, iy, ix]
                            for c in range(channels):  # bitwise: a select, vectorised
                                a, v = m[c], src[c]
                                m[c] = a if (a > v) | (a != a) else v
                for c in range(channels):
                    ib[c] = k
                for ky in range(kh):
                    iy = oy * sh + ky - ph
                    for kx in range(kw):
                        ix = ox * sw + kx - pw
                        j = ky * kw + kx
                        if 0 <= iy < height and 0 <= ix < width:
                            src = x[b, iy, ix]
                            for c in range(channels):
                                ib[c] = j if (ib[c] == k) & (src[c] == m[c]) else ib[c]
                        else:
                            for c in range(channels):
                                ib[c] = j if (ib[c] == k) & (m[c] == ninf) else ib[c]


@_jit
def pool_2d_backward(dy, idx, dx, kh, kw, sh, sw, ph, pw, routed):
    """Pooling's input gradient into the zeroed, unpadded ``dx [B, H, W, C]`` from
    ``dy [B, OH, OW, C]`` (any strides), kernel offset by kernel offset as the reference's
    scatter adds them; positions in the padding are dropped. ``routed`` (max pooling): each
    gradient goes to its window's first maximum, the offset ``idx [B, OH, OW, C]``; otherwise
    (average pooling; ``idx`` unread) every position of a window gets ``dy·(1/(kh·kw))``. (For
    the average, ``scatter_add_2d`` over the shares seen through a zero-stride window axis
    gives the same sums, slower: 2.6 against 1.5–1.8 ms with the forward, for
    ``AvgPool2D(3, stride=2)`` on ``[64, 32, 28, 28]``.)"""
    batch, oh, ow, channels = dy.shape
    height, width = dx.shape[1], dx.shape[2]
    share = dx.dtype.type(1.0 / (kh * kw))
    for b in range(batch):
        for ky in range(kh):
            for oy in range(oh):
                iy = oy * sh + ky - ph
                if iy < 0 or iy >= height:
                    continue
                for kx in range(kw):
                    j = ky * kw + kx
                    for ox in range(ow):
                        ix = ox * sw + kx - pw
                        if ix < 0 or ix >= width:
                            continue
                        d, g = dx[b, iy, ix], dy[b, oy, ox]
                        if routed:
                            ib = idx[b, oy, ox]
                            for c in range(channels):
                                d[c] = d[c] + g[c] if ib[c] == j else d[c]
                        else:
                            for c in range(channels):
                                d[c] += g[c] * share


@_jit
def avg_pool_2d(x, y, kh, kw, sh, sw, ph, pw):
    """Average pooling of ``x [B, H, W, C]`` (any strides) into ``y [B, OH, OW, C]``, zero
    padding counted in the divisor: the window's values (padding as zeros) added in row-major
    offset order, then divided by ``kh·kw``, as numpy's ``mean`` over the gathered windows
    does."""
    batch, oh, ow, channels = y.shape
    height, width = x.shape[1], x.shape[2]
    zero = y.dtype.type(0.0)
    count = y.dtype.type(kh * kw)
    for b in range(batch):
        for oy in range(oh):
            for ox in range(ow):
                s = y[b, oy, ox]
                for ky in range(kh):
                    iy = oy * sh + ky - ph
                    for kx in range(kw):
                        ix = ox * sw + kx - pw
                        first = ky == 0 and kx == 0
                        if 0 <= iy < height and 0 <= ix < width:
                            src = x[b, iy, ix]
                            if first:
                                for c in range(channels):
                                    s[c] = src[c]
                            else:
                                for c in range(channels):
                                    s[c] = s[c] + src[c]
                        elif first:  # padding: a zero, added as the reference adds it
                            for c in range(channels):
                                s[c] = zero
                        else:
                            for c in range(channels):
                                s[c] = s[c] + zero
                for c in range(channels):
                    s[c] = s[c] / count
