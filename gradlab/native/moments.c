/* One-pass moments of float32 and bfloat16 CPU tensors, for gradlab's recorder.
 *
 * Each function reads its tensors once, in memory order. The work is split over OpenMP
 * threads: PyTorch has already loaded libgomp.so.1, so this library binds to the same
 * runtime and its thread pool instead of starting a second one. Values are summed in
 * float32 SIMD lanes over blocks of BLOCK elements and the block sums in float64; every
 * thread keeps its own partial sums, which are added in thread order afterwards, so a
 * result depends on the data and the thread count only (not on scheduling).
 *
 * Results are written to `out` as float32 (out_f64 == 0) or float64 (out_f64 != 0): straight
 * into the recorder's buffer, so a measurement is one call and no copies.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#else /* built without -fopenmp (PyTorch on another OpenMP runtime): one thread, pragmas ignored */
static int omp_get_thread_num(void) { return 0; }
#endif

typedef int64_t i64;
enum { F32 = 0, BF16 = 1 };
#define BLOCK 4096 /* elements summed in float32 before a float64 addition */
#define PARALLEL_MIN (1 << 16) /* smaller tensors: one thread (waking the others costs more) */
#define INLINE static inline __attribute__((always_inline))

INLINE float load(const void *p, i64 i, int dtype) {
    if (dtype == BF16) {
        uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16; /* bf16 is float32's top half */
        float v;
        memcpy(&v, &bits, sizeof v);
        return v;
    }
    return ((const float *)p)[i];
}

static void put(void *out, int out_f64, i64 i, double v) {
    if (out_f64)
        ((double *)out)[i] = v;
    else
        ((float *)out)[i] = (float)v;
}

/* Per-thread partial sums: `width` doubles for each of `threads` threads, zeroed. */
static double *partials(int threads, i64 width) { return calloc((size_t)threads * (size_t)width, sizeof(double)); }

/* ---- activations: [sum, sum over channels of (channel sum)^2, sum of squares, count <= 0] ---- */

#define LANES 16 /* channels summed together in registers: one AVX-512 vector of float32 */

/* Rows [r0, r1) of C contiguous channels: per-channel sums, squares and counts <= 0 added to
 * s, q, np. The rows are swept once per group of LANES channels; they fit in the L1 cache. */
INLINE void rows_block(const void *x, i64 r0, i64 r1, i64 C, int dtype, float *s, float *q, float *np) {
    i64 c0 = 0;
    for (; c0 + LANES <= C; c0 += LANES) {
        float ls[LANES] = {0}, lq[LANES] = {0}, ln[LANES] = {0};
        for (i64 r = r0; r < r1; r++) {
#pragma omp simd
            for (int c = 0; c < LANES; c++) {
                const float v = load(x, r * C + c0 + c, dtype);
                ls[c] += v;
                lq[c] += v * v;
                ln[c] += v <= 0.0f;
            }
        }
        for (int c = 0; c < LANES; c++) s[c0 + c] += ls[c], q[c0 + c] += lq[c], np[c0 + c] += ln[c];
    }
    for (i64 r = r0; r < r1 && c0 < C; r++) { /* the last C % LANES channels */
        for (i64 c = c0; c < C; c++) {
            const float v = load(x, r * C + c, dtype);
            s[c] += v;
            q[c] += v * v;
            np[c] += v <= 0.0f;
        }
    }
}

/* Elements [i0, i1) of one channel: res = [sum, sum of squares, count <= 0]. */
INLINE void plane_block(const void *x, i64 i0, i64 i1, int dtype, float res[3]) {
    float s = 0.0f, q = 0.0f, np = 0.0f;
#pragma omp simd reduction(+ : s, q, np)
    for (i64 i = i0; i < i1; i++) {
        const float v = load(x, i, dtype);
        s += v;
        q += v * v;
        np += v <= 0.0f;
    }
    res[0] = s, res[1] = q, res[2] = np;
}

/* x viewed as [outer, C, inner] in memory: NCHW is (N, C, H*W); NHWC and [N, C] are (N*H*W or N, C, 1). */
static int act_kernel(const void *x, i64 outer, i64 C, i64 inner, int dtype, int threads, double res[4]) {
    if (outer * C * inner < PARALLEL_MIN) threads = 1;
    const i64 width = C + 2; /* channel sums, then the sum of squares and the count <= 0 */
    double *part = partials(threads, width);
    int failed = part == NULL;
#pragma omp parallel num_threads(threads) if (!failed && threads > 1)
    {
        double *mine = part + (i64)omp_get_thread_num() * width;
        if (inner == 1) { /* channels contiguous: column sums of rows of C */
            float *lane = malloc(3 * (size_t)C * sizeof(float));
            if (lane == NULL) {
#pragma omp atomic write
                failed = 1;
            }
            const i64 rows = C >= BLOCK ? 1 : BLOCK / C, blocks = (outer + rows - 1) / rows;
#pragma omp for schedule(static)
            for (i64 b = 0; b < blocks; b++) {
                if (lane == NULL) continue;
                float *s = lane, *q = lane + C, *np = lane + 2 * C;
                memset(lane, 0, 3 * (size_t)C * sizeof(float));
                const i64 r1 = (b + 1) * rows < outer ? (b + 1) * rows : outer;
                if (dtype == BF16)
                    rows_block(x, b * rows, r1, C, BF16, s, q, np);
                else
                    rows_block(x, b * rows, r1, C, F32, s, q, np);
                for (i64 c = 0; c < C; c++) {
                    mine[c] += s[c];
                    mine[C] += q[c];
                    mine[C + 1] += np[c];
                }
            }
            free(lane);
        } else { /* channel planes of `inner` contiguous values */
#pragma omp for schedule(static)
            for (i64 p = 0; p < outer * C; p++) {
                const i64 base = p * inner;
                for (i64 i0 = 0; i0 < inner; i0 += BLOCK) {
                    const i64 i1 = i0 + BLOCK < inner ? i0 + BLOCK : inner;
                    float s[3];
                    if (dtype == BF16)
                        plane_block(x, base + i0, base + i1, BF16, s);
                    else
                        plane_block(x, base + i0, base + i1, F32, s);
                    mine[p % C] += s[0];
                    mine[C] += s[1];
                    mine[C + 1] += s[2];
                }
            }
        }
    }
    if (failed) {
        free(part);
        return -1;
    }
    double total = 0.0, chan_sum_sq = 0.0, sq = 0.0, nonpos = 0.0;
    for (i64 c = 0; c < C; c++) {
        double chan = 0.0;
        for (int t = 0; t < threads; t++) chan += part[t * width + c];
        total += chan;
        chan_sum_sq += chan * chan;
    }
    for (int t = 0; t < threads; t++) {
        sq += part[t * width + C];
        nonpos += part[t * width + C + 1];
    }
    free(part);
    res[0] = total, res[1] = chan_sum_sq, res[2] = sq, res[3] = nonpos;
    return 0;
}

/* Writes `count` results from `first` of [sum, chan_sum_sq, sumsq, nonpos]: 0, 4 gives the
 * activation moments, 1, 2 the channel moments. Returns 0, or -1 when out of memory. */
static int activation_moments(const void *x, int dtype, i64 outer, i64 C, i64 inner, int threads, int first, int count,
                              void *out, int out_f64) {
    double res[4];
    if (act_kernel(x, outer, C, inner, dtype, threads, res)) return -1;
    for (int i = 0; i < count; i++) put(out, out_f64, i, res[first + i]);
    return 0;
}

/* ---- gradients: [sum of squares, count of inf and NaN], and ||g - other||^2 ---- */

/* Elements [i0, i1): res = [sum of g^2, count of inf and NaN in g, sum of (g - other)^2]. */
INLINE void grad_block(const void *g, const void *other, i64 i0, i64 i1, int dtype, float res[3]) {
    float q = 0.0f, bad = 0.0f, d = 0.0f;
    if (other == NULL) {
#pragma omp simd reduction(+ : q, bad)
        for (i64 i = i0; i < i1; i++) {
            const float v = load(g, i, dtype);
            q += v * v;
            bad += !(fabsf(v) <= FLT_MAX); /* inf or NaN */
        }
    } else {
#pragma omp simd reduction(+ : q, bad, d)
        for (i64 i = i0; i < i1; i++) {
            const float v = load(g, i, dtype), w = v - load(other, i, dtype);
            q += v * v;
            bad += !(fabsf(v) <= FLT_MAX);
            d += w * w;
        }
    }
    res[0] = q, res[1] = bad, res[2] = d;
}

/* The first `count` (1 or 2) of [||g||^2, inf and NaN count] to `out`; with `other` (same
 * shape and memory order) also ||g - other||^2 to `diff_out`. */
static int grad_moments(const void *g, const void *other, int dtype, i64 n, int threads, int count, void *out,
                        void *diff_out, int out_f64) {
    const i64 width = 3, blocks = (n + BLOCK - 1) / BLOCK;
    if (n < PARALLEL_MIN) threads = 1;
    double *part = partials(threads, width);
    if (part == NULL) return -1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        double *mine = part + (i64)omp_get_thread_num() * width;
#pragma omp for schedule(static)
        for (i64 b = 0; b < blocks; b++) {
            const i64 i0 = b * BLOCK, i1 = i0 + BLOCK < n ? i0 + BLOCK : n;
            float res[3];
            if (dtype == BF16)
                grad_block(g, other, i0, i1, BF16, res);
            else
                grad_block(g, other, i0, i1, F32, res);
            for (int k = 0; k < 3; k++) mine[k] += res[k];
        }
    }
    double total[3] = {0.0, 0.0, 0.0};
    for (int t = 0; t < threads; t++)
        for (int k = 0; k < 3; k++) total[k] += part[t * width + k];
    free(part);
    for (int k = 0; k < count && k < 2; k++) put(out, out_f64, k, total[k]);
    if (other != NULL) put(diff_out, out_f64, 0, total[2]);
    return 0;
}

/* ---- one path's share of a ReLU's input gradient: sum of g^2 where relu_out > 0 ---- */

INLINE float relu_block(const void *g, int gtype, const void *r, int rtype, i64 i0, i64 i1) {
    float q = 0.0f;
#pragma omp simd reduction(+ : q)
    for (i64 i = i0; i < i1; i++) {
        const float v = load(g, i, gtype);
        q += load(r, i, rtype) > 0.0f ? v * v : 0.0f; /* a select, as threshold_backward */
    }
    return q;
}

static int relu_part_sumsq(const void *g, int gtype, const void *r, int rtype, i64 n, int threads, void *out,
                           int out_f64) {
    const i64 blocks = (n + BLOCK - 1) / BLOCK;
    if (n < PARALLEL_MIN) threads = 1;
    double *part = partials(threads, 1);
    if (part == NULL) return -1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        double *mine = part + omp_get_thread_num();
#pragma omp for schedule(static)
        for (i64 b = 0; b < blocks; b++) {
            const i64 i0 = b * BLOCK, i1 = i0 + BLOCK < n ? i0 + BLOCK : n;
            if (gtype == BF16)
                *mine += rtype == BF16 ? relu_block(g, BF16, r, BF16, i0, i1) : relu_block(g, BF16, r, F32, i0, i1);
            else
                *mine += rtype == BF16 ? relu_block(g, F32, r, BF16, i0, i1) : relu_block(g, F32, r, F32, i0, i1);
        }
    }
    double total = 0.0;
    for (int t = 0; t < threads; t++) total += part[t];
    free(part);
    put(out, out_f64, 0, total);
    return 0;
}

/* ---- parameters: squared norms of many float32 tensors ---- */

/* out[i] = ||a[i] - b[i]||^2 (||a[i]||^2 when b is NULL) as float64; with `copy`, a[i] is also
 * copied to copy[i] in the same pass; with `bad`, bad[i] = the count of inf and NaN in a[i]. */
static int sumsq_many(i64 k, const float *const *a, const float *const *b, float *const *copy, const i64 *numel,
                      int threads, double *out, double *bad) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1 && k > 1)
    for (i64 t = 0; t < k; t++) {
        const float *x = a[t], *y = b ? b[t] : NULL;
        const i64 n = numel[t];
        double total = 0.0, nonfinite = 0.0;
        for (i64 i0 = 0; i0 < n; i0 += BLOCK) {
            const i64 i1 = i0 + BLOCK < n ? i0 + BLOCK : n;
            float q = 0.0f, nf = 0.0f;
            if (y == NULL) {
#pragma omp simd reduction(+ : q, nf)
                for (i64 i = i0; i < i1; i++) {
                    q += x[i] * x[i];
                    nf += !(fabsf(x[i]) <= FLT_MAX);
                }
            } else {
#pragma omp simd reduction(+ : q, nf)
                for (i64 i = i0; i < i1; i++) {
                    q += (x[i] - y[i]) * (x[i] - y[i]);
                    nf += !(fabsf(x[i]) <= FLT_MAX);
                }
            }
            total += q, nonfinite += nf;
        }
        if (copy) memcpy(copy[t], x, (size_t)n * sizeof(float));
        out[t] = total;
        if (bad) bad[t] = nonfinite;
    }
    return 0;
}

/* ---- entry points: every argument in one int64 array (pointers as integers, 0 for NULL) ----
 * One array argument keeps a call from Python cheap: ctypes converts a typed argument list
 * one argument at a time, which costs microseconds inside the recorder's hooks. */

#define P(v) ((void *)(intptr_t)(v))

/* x, dtype, outer, C, inner, threads, first, count, out, out_f64 */
int gl_activation_moments(const i64 *a) {
    return activation_moments(P(a[0]), (int)a[1], a[2], a[3], a[4], (int)a[5], (int)a[6], (int)a[7], P(a[8]), (int)a[9]);
}

/* g, other, dtype, n, threads, count, out, diff_out, out_f64 */
int gl_grad_moments(const i64 *a) {
    return grad_moments(P(a[0]), P(a[1]), (int)a[2], a[3], (int)a[4], (int)a[5], P(a[6]), P(a[7]), (int)a[8]);
}

/* g, gtype, relu_out, rtype, n, threads, out, out_f64 */
int gl_relu_part_sumsq(const i64 *a) {
    return relu_part_sumsq(P(a[0]), (int)a[1], P(a[2]), (int)a[3], a[4], (int)a[5], P(a[6]), (int)a[7]);
}

/* k, tensors, minus, copy_to, numel, threads, out, bad: arrays of k pointers, sizes or results */
int gl_sumsq_many(const i64 *a) {
    return sumsq_many(a[0], P(a[1]), P(a[2]), P(a[3]), P(a[4]), (int)a[5], P(a[6]), P(a[7]));
}
