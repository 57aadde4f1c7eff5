// Greedy non-maximum suppression on the GPU: hard NMS, IoU-guided NMS (IoU-Net, Algorithm 1)
// and Soft-NMS (Bodla et al. 2017).
//
// Written from the algorithm in workbench/ops/nms.py (_greedy_nms), the reference these kernels
// are tested against. They must reproduce its decisions exactly, hence:
//   * the IoU is computed in the same operation order as workbench.ops.boxes.pairwise_iou, with
//     explicitly rounded intrinsics so the compiler cannot fuse a*b+c into an FMA (which rounds
//     once instead of twice and can move an IoU across the threshold);
//   * IoUs are compared to the threshold in double, as the CPU path does;
//   * ties in the ranking key go to the lower index.
//
// Hard and IoU-guided NMS (boxes pre-sorted by the ranking key, stable, on the host):
//   nms_mask_<T>  mask[i][w] bit b set  <=>  j = 64 w + b > i and IoU(i, j) > threshold
//   nms_scan_<T>  one block walks i = 0..n-1 and keeps i unless a kept box removed it; with
//                 scores it also gives each kept box the max score over the boxes it removed,
//                 with suppressors it records which kept box removed each box.
// Soft-NMS (boxes in input order):
//   soft_nms_<T>  one block runs the whole sequential loop.
// Suppressors (optional, may be null): -1 for a kept box, else the (sorted, for the scan) index of
// the kept box that removed it; Soft-NMS writes -2 for a box below score_threshold from the start.
//
// Entry points: <name>_float and <name>_double. No host code; compiled by NVRTC through CuPy.

// Boxes per mask word. The mask kernel runs one thread per row of a 64 x 64 tile, so its block
// size must equal this.
#define NMS_WORD_BITS 64
// Upper bound on warps per block (1024 threads), for the per-warp slots of the block reductions.
// The single-block kernels take any block size that is a multiple of 32, up to 1024.
#define NMS_MAX_WARPS 32
#define NMS_FULL_WARP 0xffffffffu

// ---- exactly rounded arithmetic, overloaded so the templates read like the formulas ----------

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float exp_(float a) { return expf(a); }
__device__ __forceinline__ double exp_(double a) { return exp(a); }

template <typename T>
__device__ __forceinline__ T max_(T a, T b) { return a > b ? a : b; }
template <typename T>
__device__ __forceinline__ T min_(T a, T b) { return a < b ? a : b; }

// IoU of boxes a and b, (x0, y0, x1, y1), in the order of pairwise_iou with a as the first box:
// areas, intersection extents clamped at 0, inter / (area_a + area_b - inter). Two zero-area
// boxes give 0/0 = NaN, which fails every comparison, as on the CPU.
template <typename T>
__device__ __forceinline__ T box_iou(const T* a, const T* b) {
    const T area_a = mul_rn(sub_rn(a[2], a[0]), sub_rn(a[3], a[1]));
    const T area_b = mul_rn(sub_rn(b[2], b[0]), sub_rn(b[3], b[1]));
    const T w = max_(sub_rn(min_(a[2], b[2]), max_(a[0], b[0])), T(0));
    const T h = max_(sub_rn(min_(a[3], b[3]), max_(a[1], b[1])), T(0));
    const T inter = mul_rn(w, h);
    return div_rn(inter, sub_rn(add_rn(area_a, area_b), inter));
}

// ---- block reductions (every thread of the block must call them; all get the result) ---------
// They end with all threads reading the warp slots: the caller must __syncthreads() before the
// next reduction overwrites them.

template <typename T>
__device__ T block_max(T v, T* slots) {
    for (int offset = 16; offset > 0; offset >>= 1) v = max_(v, __shfl_down_sync(NMS_FULL_WARP, v, offset));
    if ((threadIdx.x & 31) == 0) slots[threadIdx.x >> 5] = v;
    __syncthreads();
    T best = slots[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) best = max_(best, slots[w]);
    return best;
}

// (score, index) pairs: higher score wins, equal scores go to the lower index; index < 0 is "none".
template <typename T>
__device__ __forceinline__ bool ranks_before(T s, long long i, T other_s, long long other_i) {
    if (i < 0) return false;
    if (other_i < 0) return true;
    return s > other_s || (s == other_s && i < other_i);
}

template <typename T>
__device__ void block_argmax(T& s, long long& i, T* slot_s, long long* slot_i) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const T other_s = __shfl_down_sync(NMS_FULL_WARP, s, offset);
        const long long other_i = __shfl_down_sync(NMS_FULL_WARP, i, offset);
        if (ranks_before(other_s, other_i, s, i)) { s = other_s; i = other_i; }
    }
    if ((threadIdx.x & 31) == 0) { slot_s[threadIdx.x >> 5] = s; slot_i[threadIdx.x >> 5] = i; }
    __syncthreads();
    s = slot_s[0];
    i = slot_i[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w)
        if (ranks_before(slot_s[w], slot_i[w], s, i)) { s = slot_s[w]; i = slot_i[w]; }
}

// ---- hard / IoU-guided NMS ---------------------------------------------------------------------

// boxes: (n, 4), sorted by decreasing ranking key. mask: (n, words), words = ceil(n / 64).
// The (row tile, column tile) pairs are walked by a grid-stride loop, so any grid size works.
// Tiles left of the diagonal (pairs j < i only) are skipped and left unwritten: the scan reads
// row i from word i / 64 on.
template <typename T>
__device__ void nms_mask_impl(const T* __restrict__ boxes, long long n, double iou_threshold,
                              unsigned long long* __restrict__ mask) {
    __shared__ T cols[NMS_WORD_BITS * 4];
    const long long words = (n + NMS_WORD_BITS - 1) / NMS_WORD_BITS;
    const long long tiles = words * words;
    for (long long t = blockIdx.x; t < tiles; t += gridDim.x) {  // uniform across the block
        const long long row_tile = t / words, col_tile = t % words;
        const long long i = row_tile * NMS_WORD_BITS + threadIdx.x;
        if (col_tile < row_tile) continue;
        const long long col0 = col_tile * NMS_WORD_BITS;
        const int ncols = (int)min((long long)NMS_WORD_BITS, n - col0);
        __syncthreads();  // the previous tile's reads of cols are done
        if ((int)threadIdx.x < ncols)
            for (int c = 0; c < 4; ++c) cols[threadIdx.x * 4 + c] = boxes[(col0 + threadIdx.x) * 4 + c];
        __syncthreads();
        if (i < n) {
            const T* row = boxes + i * 4;
            unsigned long long bits = 0ull;
            // On the diagonal tile only the columns after row i count.
            for (int k = (col_tile == row_tile) ? (int)threadIdx.x + 1 : 0; k < ncols; ++k)
                if ((double)box_iou(row, cols + k * 4) > iou_threshold) bits |= 1ull << k;
            mask[i * words + col_tile] = bits;
        }
    }
}

// Launched as ONE block with dynamic shared memory of words * 8 bytes (the "removed" bitset).
// keep[0..count) receives the kept positions in the sorted order. scores (sorted like the boxes)
// and new_scores may be null; when given, new_scores[k] = max(scores[i], scores[j] for the j that
// the k-th kept box i removes now). suppressors may be null; when given, every entry is written.
template <typename T>
__device__ void nms_scan_impl(const unsigned long long* __restrict__ mask, long long n,
                              const T* __restrict__ scores, T* __restrict__ new_scores,
                              long long* __restrict__ suppressors,
                              long long* __restrict__ keep, long long* __restrict__ count) {
    extern __shared__ unsigned long long removed[];
    __shared__ T slots[NMS_MAX_WARPS];
    const long long words = (n + NMS_WORD_BITS - 1) / NMS_WORD_BITS;
    for (long long w = threadIdx.x; w < words; w += blockDim.x) removed[w] = 0ull;
    __syncthreads();
    long long kept = 0;
    for (long long i = 0; i < n; ++i) {
        const long long wi = i / NMS_WORD_BITS;
        // Every thread reads the same bit, so the branch is uniform and the barriers below are safe.
        if ((removed[wi] >> (i % NMS_WORD_BITS)) & 1ull) continue;
        const unsigned long long* row = mask + i * words;  // valid from word wi on
        T best = T(0);
        if (scores != nullptr || suppressors != nullptr) {
            T local = scores != nullptr ? scores[i] : T(0);
            for (long long w = wi + threadIdx.x; w < words; w += blockDim.x) {
                unsigned long long fresh = row[w] & ~removed[w];  // removed by i now, not before
                while (fresh) {
                    const long long j = w * NMS_WORD_BITS + (__ffsll((long long)fresh) - 1);
                    fresh &= fresh - 1ull;
                    if (scores != nullptr) local = max_(local, scores[j]);
                    if (suppressors != nullptr) suppressors[j] = i;
                }
            }
            if (scores != nullptr) best = block_max(local, slots);  // uniform condition: safe barrier
        }
        __syncthreads();  // every thread has read removed[] for box i before it changes
        for (long long w = wi + threadIdx.x; w < words; w += blockDim.x) removed[w] |= row[w];
        if (threadIdx.x == 0) {
            keep[kept] = i;
            if (scores != nullptr) new_scores[kept] = best;
            if (suppressors != nullptr) suppressors[i] = -1;
        }
        ++kept;
        __syncthreads();  // removed[] is complete before box i + 1 is tested; slots are free again
    }
    if (threadIdx.x == 0) *count = kept;
}

// ---- Soft-NMS ----------------------------------------------------------------------------------

// Launched as ONE block. boxes: (n, 4) and scores: (n) in input order; scores is a work copy,
// decayed in place; alive: (n) scratch. keep/kept_scores[0..count) receive the selected indices
// and their scores at selection; suppressors (may be null) gets every entry written. Box j is only
// ever touched by thread j % blockDim.x, in every loop, so alive[], scores[] and suppressors[]
// need no barrier of their own.
template <typename T>
__device__ void soft_nms_impl(const T* __restrict__ boxes, T* __restrict__ scores, unsigned char* __restrict__ alive,
                              long long n, double iou_threshold, double sigma, double score_threshold, int gaussian,
                              long long* __restrict__ suppressors, long long* __restrict__ keep,
                              T* __restrict__ kept_scores, long long* __restrict__ count) {
    __shared__ T slot_s[NMS_MAX_WARPS];
    __shared__ long long slot_i[NMS_MAX_WARPS];
    const T sigma_t = (T)sigma;  // the CPU path divides by sigma in the scores' dtype too
    for (long long j = threadIdx.x; j < n; j += blockDim.x) {
        alive[j] = (double)scores[j] >= score_threshold;
        if (suppressors != nullptr) suppressors[j] = alive[j] ? -1 : -2;
    }
    long long kept = 0;
    while (true) {
        T s = T(0);
        long long top = -1;
        for (long long j = threadIdx.x; j < n; j += blockDim.x)  // j ascending: strict > keeps the lowest index
            if (alive[j] && (top < 0 || scores[j] > s)) { s = scores[j]; top = j; }
        block_argmax(s, top, slot_s, slot_i);
        if (top < 0) break;  // uniform: every thread got the same winner
        if (threadIdx.x == 0) { keep[kept] = top; kept_scores[kept] = s; }
        ++kept;
        const T* selected = boxes + top * 4;
        for (long long j = threadIdx.x; j < n; j += blockDim.x) {
            if (!alive[j]) continue;
            if (j == top) { alive[j] = 0; continue; }
            const T iou = box_iou(selected, boxes + j * 4);
            T score = scores[j];
            if (gaussian) {
                if (iou == iou) score = mul_rn(score, exp_(div_rn(-mul_rn(iou, iou), sigma_t)));  // NaN: no decay
            } else if ((double)iou >= iou_threshold) {
                score = mul_rn(score, sub_rn(T(1), iou));
            }
            scores[j] = score;
            if ((double)score < score_threshold) {
                alive[j] = 0;
                if (suppressors != nullptr) suppressors[j] = top;
            }
        }
        __syncthreads();  // all threads have read the slots before the next round writes them
    }
    if (threadIdx.x == 0) *count = kept;
}

// ---- entry points --------------------------------------------------------------------------------

#define NMS_ENTRY_POINTS(T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(NMS_WORD_BITS)                                               \
    nms_mask_##T(const T* boxes, long long n, double iou_threshold, unsigned long long* mask) {              \
        nms_mask_impl<T>(boxes, n, iou_threshold, mask);                                                      \
    }                                                                                                         \
    extern "C" __global__ void nms_scan_##T(const unsigned long long* mask, long long n, const T* scores,     \
                                            T* new_scores, long long* suppressors, long long* keep,          \
                                            long long* count) {                                              \
        nms_scan_impl<T>(mask, n, scores, new_scores, suppressors, keep, count);                              \
    }                                                                                                         \
    extern "C" __global__ void soft_nms_##T(const T* boxes, T* scores, unsigned char* alive, long long n,    \
                                            double iou_threshold, double sigma, double score_threshold,      \
                                            int gaussian, long long* suppressors, long long* keep,           \
                                            T* kept_scores, long long* count) {                              \
        soft_nms_impl<T>(boxes, scores, alive, n, iou_threshold, sigma, score_threshold, gaussian,          \
                         suppressors, keep, kept_scores, count);                                              \
    }

NMS_ENTRY_POINTS(float)
NMS_ENTRY_POINTS(double)
