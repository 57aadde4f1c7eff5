// Precise RoI Pooling (IoU-Net, Eq. 2-4): forward, gradient to features, gradient to box coordinates.
//
// Written from the math in workbench/ops/prroi_pool.py, which is the reference these kernels are
// tested against. Sample d[i, j] sits at (x = j, y = i); the continuous map is
// f(x, y) = sum_ij d[i, j] tri(x - j) tri(y - i), tri(t) = max(0, 1 - |t|), zero outside the map.
// A bin [xs, xe] x [ys, ye] integrates to sum_ij d[i, j] Wy[i] Wx[j] with Wx[j] = P(xe - j) - P(xs - j),
// P the antiderivative of tri; its derivative w.r.t. xe is sum_ij d[i, j] Wy[i] tri(xe - j) (Eq. 4).
//
// Layouts: features (N, C, H, W), rois (K, 5) rows (batch, x0, y0, x1, y1), output (K, C, PH, PW),
// all contiguous. Every kernel is a grid-stride loop, so any grid size is correct.
// Entry points: <name>_float and <name>_double.

// Integral of tri from -inf to t.
template <typename T>
__device__ __forceinline__ T tri_primitive(T t) {
    if (t <= T(-1)) return T(0);
    if (t >= T(1)) return T(1);
    if (t <= T(0)) return T(0.5) * (t + T(1)) * (t + T(1));
    return T(0.5) + t - T(0.5) * t * t;
}

template <typename T>
__device__ __forceinline__ T tri(T t) {
    T a = T(1) - fabs(t);
    return a > T(0) ? a : T(0);
}

// Interpolation weight of sample index s for the interval [lo, hi].
template <typename T>
__device__ __forceinline__ T interval_weight(T lo, T hi, int s) {
    return tri_primitive(hi - T(s)) - tri_primitive(lo - T(s));
}

// One bin of one RoI in feature-map coordinates, and the window of samples that can touch it.
template <typename T>
struct Bin {
    int batch;
    T xs, xe, ys, ye;    // bin edges
    T bw, bh;            // bin size (>= 0)
    int i0, i1, j0, j1;  // inclusive sample window, clipped to the map (empty if i0 > i1 or j0 > j1)
};

template <typename T>
__device__ __forceinline__ Bin<T> make_bin(const T* roi, T scale, int ph, int pw, int PH, int PW, int H, int W) {
    Bin<T> b;
    b.batch = static_cast<int>(roi[0]);
    const T x0 = roi[1] * scale, y0 = roi[2] * scale;
    const T x1 = roi[3] * scale, y1 = roi[4] * scale;
    b.bw = (x1 > x0 ? x1 - x0 : T(0)) / T(PW);
    b.bh = (y1 > y0 ? y1 - y0 : T(0)) / T(PH);
    b.xs = x0 + T(pw) * b.bw;
    b.xe = x0 + T(pw + 1) * b.bw;
    b.ys = y0 + T(ph) * b.bh;
    b.ye = y0 + T(ph + 1) * b.bh;
    // Sample j touches [xs, xe] only if xs - 1 < j < xe + 1, i.e. floor(xs) <= j <= ceil(xe).
    // Clamp in floating point first so huge coordinates cannot overflow the int conversion.
    b.j0 = static_cast<int>(fmin(fmax(floor(b.xs), T(0)), T(W)));
    b.j1 = static_cast<int>(fmax(fmin(ceil(b.xe), T(W - 1)), T(-1)));
    b.i0 = static_cast<int>(fmin(fmax(floor(b.ys), T(0)), T(H)));
    b.i1 = static_cast<int>(fmax(fmin(ceil(b.ye), T(H - 1)), T(-1)));
    return b;
}

// Output element idx of a (K, C, PH, PW) tensor -> its RoI k, channel c and bin (ph, pw).
struct OutputIndex {
    long long k;
    int c, ph, pw;
};

__device__ __forceinline__ OutputIndex unravel(long long idx, int C, int PH, int PW) {
    OutputIndex o;
    o.pw = idx % PW;
    o.ph = (idx / PW) % PH;
    o.c = (idx / ((long long)PW * PH)) % C;
    o.k = idx / ((long long)PW * PH * C);
    return o;
}

template <typename T>
__device__ void prroi_forward(const T* __restrict__ features, const T* __restrict__ rois, T* __restrict__ out,
                              int C, int H, int W, int PH, int PW, T scale, long long total) {
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const OutputIndex o = unravel(idx, C, PH, PW);
        const Bin<T> b = make_bin(rois + 5 * o.k, scale, o.ph, o.pw, PH, PW, H, W);
        const T area = b.bw * b.bh;
        if (area <= T(0)) {
            out[idx] = T(0);
            continue;
        }
        const T* map = features + ((long long)b.batch * C + o.c) * H * W;
        T acc = T(0);
        for (int i = b.i0; i <= b.i1; ++i) {
            const T wy = interval_weight(b.ys, b.ye, i);
            if (wy == T(0)) continue;
            T row = T(0);
            for (int j = b.j0; j <= b.j1; ++j) row += map[(long long)i * W + j] * interval_weight(b.xs, b.xe, j);
            acc += wy * row;
        }
        out[idx] = acc / area;
    }
}

template <typename T>
__device__ void prroi_backward_features(const T* __restrict__ grad_out, const T* __restrict__ rois,
                                        T* __restrict__ grad_features, int C, int H, int W, int PH, int PW, T scale,
                                        long long total) {
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const OutputIndex o = unravel(idx, C, PH, PW);
        const Bin<T> b = make_bin(rois + 5 * o.k, scale, o.ph, o.pw, PH, PW, H, W);
        const T area = b.bw * b.bh;
        if (area <= T(0) || grad_out[idx] == T(0)) continue;
        const T g = grad_out[idx] / area;
        T* map = grad_features + ((long long)b.batch * C + o.c) * H * W;
        for (int i = b.i0; i <= b.i1; ++i) {
            const T gy = g * interval_weight(b.ys, b.ye, i);
            if (gy == T(0)) continue;
            for (int j = b.j0; j <= b.j1; ++j) {
                const T v = gy * interval_weight(b.xs, b.xe, j);
                if (v != T(0)) atomicAdd(map + (long long)i * W + j, v);
            }
        }
    }
}

// One thread per (RoI, bin): it loops over channels so that only four atomics per bin reach the RoI.
template <typename T>
__device__ void prroi_backward_coords(const T* __restrict__ features, const T* __restrict__ rois,
                                      const T* __restrict__ grad_out, T* __restrict__ grad_rois, int C, int H, int W,
                                      int PH, int PW, T scale, long long total) {
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const int pw = idx % PW;
        const int ph = (idx / PW) % PH;
        const long long k = idx / ((long long)PW * PH);
        const Bin<T> b = make_bin(rois + 5 * k, scale, ph, pw, PH, PW, H, W);
        const T area = b.bw * b.bh;
        if (area <= T(0)) continue;
        // Gradient of the loss w.r.t. the four bin edges, summed over channels.
        T g_xs = T(0), g_xe = T(0), g_ys = T(0), g_ye = T(0);
        for (int c = 0; c < C; ++c) {
            const T g = grad_out[((k * C + c) * PH + ph) * PW + pw];
            if (g == T(0)) continue;
            const T* map = features + ((long long)b.batch * C + c) * H * W;
            // I: the bin integral; dI_* its derivatives w.r.t. the edges (line integrals, Eq. 4).
            T I = T(0), dI_xs = T(0), dI_xe = T(0), dI_ys = T(0), dI_ye = T(0);
            for (int i = b.i0; i <= b.i1; ++i) {
                T row = T(0), row_s = T(0), row_e = T(0);
                for (int j = b.j0; j <= b.j1; ++j) {
                    const T d = map[(long long)i * W + j];
                    row += d * interval_weight(b.xs, b.xe, j);
                    row_s += d * tri(b.xs - T(j));
                    row_e += d * tri(b.xe - T(j));
                }
                const T wy = interval_weight(b.ys, b.ye, i);
                I += wy * row;
                dI_xs -= wy * row_s;
                dI_xe += wy * row_e;
                dI_ys -= tri(b.ys - T(i)) * row;
                dI_ye += tri(b.ye - T(i)) * row;
            }
            // out = I / A with A = (xe - xs)(ye - ys): quotient rule on each edge.
            const T q = I / (area * area);
            g_xs += g * (dI_xs / area + q * b.bh);
            g_xe += g * (dI_xe / area - q * b.bh);
            g_ys += g * (dI_ys / area + q * b.bw);
            g_ye += g * (dI_ye / area - q * b.bw);
        }
        // Edges to box corners: xs = x0 + pw (x1 - x0) / PW, xe = x0 + (pw + 1) (x1 - x0) / PW.
        const T as = T(pw) / T(PW), ae = T(pw + 1) / T(PW);
        const T bs = T(ph) / T(PH), be = T(ph + 1) / T(PH);
        T* g_roi = grad_rois + 5 * k;
        atomicAdd(g_roi + 1, scale * (g_xs * (T(1) - as) + g_xe * (T(1) - ae)));
        atomicAdd(g_roi + 2, scale * (g_ys * (T(1) - bs) + g_ye * (T(1) - be)));
        atomicAdd(g_roi + 3, scale * (g_xs * as + g_xe * ae));
        atomicAdd(g_roi + 4, scale * (g_ys * bs + g_ye * be));
    }
}

#define PRROI_ENTRY_POINTS(T, SUFFIX)                                                                          \
    extern "C" __global__ void prroi_forward_##SUFFIX(const T* features, const T* rois, T* out, int C, int H,   \
                                                      int W, int PH, int PW, T scale, long long total) {         \
        prroi_forward<T>(features, rois, out, C, H, W, PH, PW, scale, total);                                   \
    }                                                                                                           \
    extern "C" __global__ void prroi_backward_features_##SUFFIX(const T* grad_out, const T* rois,               \
                                                                T* grad_features, int C, int H, int W, int PH,  \
                                                                int PW, T scale, long long total) {             \
        prroi_backward_features<T>(grad_out, rois, grad_features, C, H, W, PH, PW, scale, total);               \
    }                                                                                                           \
    extern "C" __global__ void prroi_backward_coords_##SUFFIX(const T* features, const T* rois,                 \
                                                              const T* grad_out, T* grad_rois, int C, int H,    \
                                                              int W, int PH, int PW, T scale, long long total) { \
        prroi_backward_coords<T>(features, rois, grad_out, grad_rois, C, H, W, PH, PW, scale, total);           \
    }

PRROI_ENTRY_POINTS(float, float)
PRROI_ENTRY_POINTS(double, double)
