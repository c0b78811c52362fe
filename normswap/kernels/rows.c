/* normswap row kernels: standardization of the rows of a (P, R, Q) array.
 *
 * Row r is the P * Q = n values x[p, r, q], one group of values that share statistics
 * (every area of normswap/norms/areas.py: P = 1 for the layer, channels, group and
 * instance areas, whose rows are contiguous; P = N for the batch area, whose rows are
 * N slices of Q contiguous values). For each row r, with v = x - mu and mu = mean(x):
 *
 *   STAT_L2    d = sqrt(mean(v^2) + delta)
 *   STAT_L1    d = C_L1 * mean(|v|) + eps
 *   STAT_TOPK  d = cinf * (mean of the k largest |v|) + eps
 *
 *   y = v / d * gamma[c] + beta[c],  c = ((r * n + i) / S) % Cq  (P = 1), c = r (P > 1)
 *
 * S = 1 with Cq = n: gamma varies along the row ("vector" recovery: layer norm);
 * S > 1 dividing n: gamma is constant on segments of S values ("segment" recovery:
 * group norm, instance norm). gamma / beta NULL: 1 / 0. Sums over a row are added
 * slice by slice in double precision.
 *
 * The backward (see ns_backward) is the hand-written gradient of normswap's
 * StatNormFn for one row. Rows are split between OpenMP threads in fixed chunks, and
 * the per-channel gradient sums are added in thread order, so a result depends only
 * on the inputs and the thread count.
 *
 * Compiled on first use by normswap/kernels/__init__.py, called through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* A thread's scratch inside an OpenMP parallel region: malloc(bytes) (zeroed if asked), or
 * NULL with *failed set (atomically: several threads may write it); the caller's loop then
 * skips that thread's share and the entry point returns nonzero, which
 * normswap.kernels.call raises as a MemoryError. */
static void *ns_thread_scratch(size_t bytes, int zeroed, int *failed) {
    void *p = zeroed ? calloc(1, bytes) : malloc(bytes);
    if (!p) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
        *failed = 1;
    }
    return p;
}

#define STAT_L2 0
#define STAT_L1 1
#define STAT_TOPK 2

#define C_L1 1.2533141373155002512078826424  /* sqrt(pi / 2) */

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static int thread_count(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

#define SIGN(v) (((v) > 0) - ((v) < 0))

/* NS_IN_REGISTER(v): the vector v is in a register from here on. A tile of products reads
 * each of its input vectors once and multiplies it into a row or column of sums; gcc
 * otherwise folds the load into every multiply-add that uses it, one load per product (12
 * loads to 8 multiply-adds in whiten_impl.h's 4 x 2 tiles of outputs: more than the two load
 * ports serve while the two multiply-add units wait). Measured on the AVX2 EPYC, one thread:
 * IterNorm2d forward + backward 0.91-0.92x (1.52-1.62 -> 1.30-1.38x nn.BatchNorm2d). Where
 * a vector is wider than a register (no AVX) it is no hint. */
#if defined(__AVX512F__)
#define NS_IN_REGISTER(v) __asm__("" : "+v"(v))
#elif defined(__AVX__)
#define NS_IN_REGISTER(v) __asm__("" : "+x"(v))
#else
#define NS_IN_REGISTER(v) ((void)0)
#endif

/* The values of a[0..n) that are >= tau, in order, into cv; returns how many. Most of a
 * long row is below tau, so it is read a vector at a time and only vectors holding a
 * candidate are looked into: with AVX-512 by the comparison's bit mask, else by pack_ge
 * (below). */
#if defined(__AVX512F__)
#include <immintrin.h>
/* One AVX-512 body for both element types: VT the vector type, MT its lane mask type, W its
 * lanes, PS the intrinsics' suffix (ps / pd). */
#define SCAN_GE_AVX512(T, SUF, VT, MT, W, PS)                                                 \
    static int64_t scan_ge_##SUF(const T *a, int64_t n, T tau, T *cv) {                       \
        const VT t = _mm512_set1_##PS(tau);                                                    \
        int64_t c = 0, i = 0;                                                                  \
        for (; i + W <= n; i += W) {                                                           \
            MT m = _mm512_cmp_##PS##_mask(_mm512_loadu_##PS(a + i), t, _CMP_GE_OQ);            \
            while (m) { cv[c++] = a[i + __builtin_ctz(m)]; m &= (MT)(m - 1); }                  \
        }                                                                                      \
        for (; i < n; i++) { cv[c] = a[i]; c += a[i] >= tau; }                                 \
        return c;                                                                              \
    }
SCAN_GE_AVX512(float, f32, __m512, __mmask16, 16, ps)
SCAN_GE_AVX512(double, f64, __m512d, __mmask8, 8, pd)
#endif

/* pack_ge: the values t_i >= tau of a[0..n), in order, into cv; returns how many. t_i is
 * a_i, or |a_i - m| where dev. dense: no test for a block without candidates (where most
 * blocks hold one, as in short rows, its branch goes each way at random). dev and dense are
 * constants at every call. cv needs no room beyond n: it is written at most up to the values
 * read so far. With AVX2 eight (four) values at a time:
 * the comparison's bit mask picks, from a table, the permutation that moves the chosen lanes
 * to the front, and one store writes them (the scalar branch-free copy it replaced costs
 * about six operations a value, and most vectors of a row's candidates' blocks hold one).
 * Without AVX2: 16 values at a time, an "any" test, then a branch-free copy. */
#if defined(__AVX2__)
#if !defined(__AVX512F__)
#include <immintrin.h>
#endif
static int32_t ns_pack_f32[256][8], ns_pack_f64[16][8];   /* lane indices, chosen lanes first */
__attribute__((constructor)) static void ns_pack_tables(void) {
    for (int mask = 0; mask < 256; mask++) {
        int c = 0;
        for (int l = 0; l < 8; l++)
            if (mask >> l & 1) ns_pack_f32[mask][c++] = l;
        while (c < 8) ns_pack_f32[mask][c++] = 0;
    }
    for (int mask = 0; mask < 16; mask++) {   /* a double is two float lanes */
        int c = 0;
        for (int l = 0; l < 4; l++)
            if (mask >> l & 1) {
                ns_pack_f64[mask][c++] = 2 * l;
                ns_pack_f64[mask][c++] = 2 * l + 1;
            }
        while (c < 8) ns_pack_f64[mask][c++] = 0;
    }
}
/* VT the vector type, W its lanes, PS the intrinsics' suffix, AS_PS its cast to __m256 */
#define PACK_GE_AVX2(T, SUF, VT, W, PS, AS_PS, ABS_)                                           \
    static inline int64_t pack_ge_##SUF(const T *a, int64_t n, T m, const int dev, T tau,      \
                                        T *cv, const int dense) {                              \
        const VT mv = _mm256_set1_##PS(m), tv = _mm256_set1_##PS(tau);                         \
        const VT sign = _mm256_set1_##PS((T)-0.0);                                             \
        int64_t c = 0, i = 0;                                                                  \
        for (; i + W <= n; i += W) {                                                           \
            VT v = _mm256_loadu_##PS(a + i);                                                   \
            if (dev) v = _mm256_andnot_##PS(sign, _mm256_sub_##PS(v, mv));                     \
            const int mask = _mm256_movemask_##PS(_mm256_cmp_##PS(v, tv, _CMP_GE_OQ));        \
            if (!dense && !mask) continue;                                                     \
            const __m256i order = _mm256_loadu_si256((const __m256i *)ns_pack_##SUF[mask]);    \
            _mm256_storeu_ps((float *)(cv + c), _mm256_permutevar8x32_ps(AS_PS(v), order));    \
            c += __builtin_popcount((unsigned)mask);                                           \
        }                                                                                      \
        for (; i < n; i++) {                                                                   \
            const T v = dev ? ABS_(a[i] - m) : a[i];                                           \
            cv[c] = v;                                                                         \
            c += v >= tau;                                                                     \
        }                                                                                      \
        return c;                                                                              \
    }
PACK_GE_AVX2(float, f32, __m256, 8, ps, , fabsf)
PACK_GE_AVX2(double, f64, __m256d, 4, pd, _mm256_castpd_ps, fabs)
#else
#define PACK_GE_GENERIC(T, SUF, ABS_)                                                          \
    static inline int64_t pack_ge_##SUF(const T *a, int64_t n, T m, const int dev, T tau,      \
                                        T *cv, const int dense) {                              \
        int64_t c = 0;                                                                         \
        for (int64_t i0 = 0; i0 < n; i0 += 16) {                                               \
            int64_t i1 = i0 + 16 < n ? i0 + 16 : n;                                            \
            int any = dense;                                                                   \
            if (!dense) {                                                                      \
                _Pragma("omp simd reduction(|:any)")                                           \
                for (int64_t i = i0; i < i1; i++) any |= (dev ? ABS_(a[i] - m) : a[i]) >= tau; \
            }                                                                                  \
            if (!any) continue;                                                                \
            for (int64_t i = i0; i < i1; i++) {                                                \
                const T v = dev ? ABS_(a[i] - m) : a[i];                                       \
                cv[c] = v;                                                                     \
                c += v >= tau;                                                                 \
            }                                                                                  \
        }                                                                                      \
        return c;                                                                              \
    }
PACK_GE_GENERIC(float, f32, fabsf)
PACK_GE_GENERIC(double, f64, fabs)
#endif
#if !defined(__AVX512F__)
static int64_t scan_ge_f32(const float *a, int64_t n, float tau, float *cv) {
    return pack_ge_f32(a, n, 0, 0, tau, cv, 0);
}
static int64_t scan_ge_f64(const double *a, int64_t n, double tau, double *cv) {
    return pack_ge_f64(a, n, 0, 0, tau, cv, 0);
}
#endif

/* Row sums in the row's precision, mode 0: sum x, 1: sum |x - m|, 2: sum (x - m)^2 (mode a
 * constant at every call). With AVX-512: four vector partial sums and a shuffle-tree
 * reduction; gcc ends an `omp simd reduction` with a scalar loop over the stored lanes
 * (16 dependent additions per sum, after one dependent vector addition per 16 values),
 * which made these sums the larger part of a short row's forward. sum_range_f32 adds in
 * the same order (the backward computes top-k rows' means again and needs them bit for
 * bit). */
#if defined(__AVX512F__)
/* (VT, MT, W, PS as for SCAN_GE_AVX512) */
#define DEV_SUM_AVX512(T, SUF, VT, MT, W, PS)                                                  \
    static inline __attribute__((always_inline)) T dev_sum_##SUF(const T *x, int64_t n, T m,  \
                                                                 const int mode) {             \
        const VT mv = _mm512_set1_##PS(m);                                                     \
        VT s0 = _mm512_setzero_##PS(), s1 = s0, s2 = s0, s3 = s0;                              \
        int64_t i = 0;                                                                         \
        for (; i + 4 * W <= n; i += 4 * W) {                                                   \
            s0 = _mm512_add_##PS(s0, NS_TERM(PS, _mm512_loadu_##PS(x + i)));                   \
            s1 = _mm512_add_##PS(s1, NS_TERM(PS, _mm512_loadu_##PS(x + i + W)));               \
            s2 = _mm512_add_##PS(s2, NS_TERM(PS, _mm512_loadu_##PS(x + i + 2 * W)));           \
            s3 = _mm512_add_##PS(s3, NS_TERM(PS, _mm512_loadu_##PS(x + i + 3 * W)));           \
        }                                                                                      \
        for (; i + W <= n; i += W) s0 = _mm512_add_##PS(s0, NS_TERM(PS, _mm512_loadu_##PS(x + i))); \
        if (i < n) {                                                                           \
            const MT tail = (MT)((1u << (n - i)) - 1u);                                        \
            s1 = _mm512_mask_add_##PS(s1, tail, s1, NS_TERM(PS, _mm512_maskz_loadu_##PS(tail, x + i))); \
        }                                                                                      \
        return _mm512_reduce_add_##PS(_mm512_add_##PS(_mm512_add_##PS(s0, s1),                \
                                                      _mm512_add_##PS(s2, s3)));              \
    }
/* the term of `mode` for a vector v (mv: m broadcast) */
#define NS_TERM(PS, v) (mode == 0 ? (v) : mode == 1 ? _mm512_abs_##PS(_mm512_sub_##PS(v, mv))        \
                        : _mm512_mul_##PS(_mm512_sub_##PS(v, mv), _mm512_sub_##PS(v, mv)))
DEV_SUM_AVX512(float, f32, __m512, __mmask16, 16, ps)
DEV_SUM_AVX512(double, f64, __m512d, __mmask8, 8, pd)
#undef NS_TERM
#define NS_PORTABLE_SUMS 0
#else
#define NS_PORTABLE_SUMS 1   /* (rows_impl.h's sum_extremes_ add in this order too) */
/* Eight partial sums in a fixed order (the compiler vectorizes the eight as one or two
 * vectors but may not reorder them: an `omp simd reduction` let it choose the order per
 * inlined copy, so the backward's mean of a row could differ in its last bit from the
 * forward's, and a top-k row's tied k-th place was then counted wrong: found on a machine
 * without AVX-512). */
#define DEV_SUM_GENERIC(T, SUF, ABSF)                                                              \
    static inline __attribute__((always_inline)) T dev_sum_##SUF(const T *x, int64_t n, T m, const int mode) { \
        T p[8] = {0, 0, 0, 0, 0, 0, 0, 0}, t = 0;                                                 \
        int64_t i = 0;                                                                             \
        for (; i + 8 <= n; i += 8)                                                                 \
            for (int j = 0; j < 8; j++) {                                                          \
                T v = x[i + j];                                                                    \
                p[j] += mode == 0 ? v : mode == 1 ? ABSF(v - m) : (v - m) * (v - m);               \
            }                                                                                      \
        for (; i < n; i++) t += mode == 0 ? x[i] : mode == 1 ? ABSF(x[i] - m) : (x[i] - m) * (x[i] - m); \
        return (((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]))) + t;           \
    }
DEV_SUM_GENERIC(float, f32, fabsf)
DEV_SUM_GENERIC(double, f64, fabs)
#endif

/* The backward's sums over one row (rows_impl.h's row_sums_, which documents them) for
 * float32 with AVX-512, the partial sums reduced by shuffle trees: out = {sum g, sum g v,
 * sum sign(v), sum sign(v) at |v| >= th, count of |v| >= th}; with `cols`, dy v inv and
 * dy added into fg, fb. Returns 0 where not compiled (the caller's loop runs). */
#if defined(__AVX512F__)
struct vsums16 { __m512 a1, a2, a3, b1, c1; };
static inline __attribute__((always_inline)) void sums_step_f32(
        struct vsums16 *s, const float *xr, const float *dyr, const float *gamma, int64_t i, __mmask16 k,
        __m512 mv, __m512 iv, __m512 tv, const int topk, const int cols, float *fg, float *fb) {
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f), mone = _mm512_set1_ps(-1.0f);
    const __m512 dy = _mm512_maskz_loadu_ps(k, dyr + i);
    const __m512 v = _mm512_maskz_sub_ps(k, _mm512_maskz_loadu_ps(k, xr + i), mv);   /* (0 past the row) */
    const __m512 g = gamma ? _mm512_mul_ps(dy, _mm512_maskz_loadu_ps(k, gamma + i)) : dy;
    const __m512 sv = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ),
                                           _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), zero, mone),
                                           one);
    s->a1 = _mm512_add_ps(s->a1, g);
    s->a2 = _mm512_add_ps(s->a2, _mm512_mul_ps(g, v));
    s->a3 = _mm512_add_ps(s->a3, sv);
    if (topk) {
        const __mmask16 ge = _mm512_cmp_ps_mask(_mm512_abs_ps(v), tv, _CMP_GE_OQ) & k;
        s->c1 = _mm512_mask_add_ps(s->c1, ge, s->c1, one);
        s->b1 = _mm512_mask_add_ps(s->b1, ge, s->b1, sv);
    }
    if (cols) {
        _mm512_mask_storeu_ps(fg + i, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, fg + i),
                                                        _mm512_mul_ps(_mm512_mul_ps(dy, v), iv)));
        _mm512_mask_storeu_ps(fb + i, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, fb + i), dy));
    }
}
static inline __attribute__((always_inline)) int sums_vec_f32(
        const float *xr, const float *dyr, const float *gamma, int64_t n, float m, float inv, float th,
        const int topk, const int cols, float *fg, float *fb, float *out) {
    const __m512 mv = _mm512_set1_ps(m), iv = _mm512_set1_ps(inv), tv = _mm512_set1_ps(th), z = _mm512_setzero_ps();
    struct vsums16 s = {z, z, z, z, z};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) sums_step_f32(&s, xr, dyr, gamma, i, (__mmask16)0xFFFF, mv, iv, tv, topk, cols, fg, fb);
    if (i < n) sums_step_f32(&s, xr, dyr, gamma, i, (__mmask16)((1u << (n - i)) - 1u), mv, iv, tv, topk, cols, fg, fb);
    out[0] = _mm512_reduce_add_ps(s.a1); out[1] = _mm512_reduce_add_ps(s.a2); out[2] = _mm512_reduce_add_ps(s.a3);
    out[3] = topk ? _mm512_reduce_add_ps(s.b1) : 0.0f; out[4] = topk ? _mm512_reduce_add_ps(s.c1) : 0.0f;
    return 1;
}
#elif defined(__AVX2__)
/* The same with AVX2 (eight lanes): gcc's `omp simd reduction` of the portable loop ended each
 * of the five sums by storing its vector and adding the eight lanes one after another (40
 * dependent scalar additions a row, with store-to-load forwarding: the largest part of a
 * short row's sums); here three rounds of horizontal additions give the five totals. A
 * row's tail is read by masked loads (zeros past the row) and fg, fb written by masked
 * stores. */
struct vsums8 { __m256 a1, a2, a3, b1, c1; };
static inline __attribute__((always_inline)) void sums_step8_f32(
        struct vsums8 *s, const float *xr, const float *dyr, const float *gamma, int64_t i, const int full,
        __m256i k, __m256 mv, __m256 iv, __m256 tv, const int topk, const int cols, float *fg, float *fb) {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), mone = _mm256_set1_ps(-1.0f);
    const __m256 kf = _mm256_castsi256_ps(k);
    const __m256 dy = full ? _mm256_loadu_ps(dyr + i) : _mm256_maskload_ps(dyr + i, k);
    __m256 v = _mm256_sub_ps(full ? _mm256_loadu_ps(xr + i) : _mm256_maskload_ps(xr + i, k), mv);
    if (!full) v = _mm256_and_ps(v, kf);   /* (0 past the row) */
    const __m256 g = gamma ? _mm256_mul_ps(dy, full ? _mm256_loadu_ps(gamma + i) : _mm256_maskload_ps(gamma + i, k))
                           : dy;
    const __m256 sv = _mm256_or_ps(_mm256_and_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ), one),
                                   _mm256_and_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ), mone));
    s->a1 = _mm256_add_ps(s->a1, g);
    s->a2 = _mm256_add_ps(s->a2, _mm256_mul_ps(g, v));
    s->a3 = _mm256_add_ps(s->a3, sv);
    if (topk) {
        const __m256 absv = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
        __m256 ge = _mm256_cmp_ps(absv, tv, _CMP_GE_OQ);
        if (!full) ge = _mm256_and_ps(ge, kf);
        s->c1 = _mm256_add_ps(s->c1, _mm256_and_ps(ge, one));
        s->b1 = _mm256_add_ps(s->b1, _mm256_and_ps(ge, sv));
    }
    if (cols) {
        const __m256 ag = _mm256_mul_ps(_mm256_mul_ps(dy, v), iv);
        if (full) {
            _mm256_storeu_ps(fg + i, _mm256_add_ps(_mm256_loadu_ps(fg + i), ag));
            _mm256_storeu_ps(fb + i, _mm256_add_ps(_mm256_loadu_ps(fb + i), dy));
        } else {
            _mm256_maskstore_ps(fg + i, k, _mm256_add_ps(_mm256_maskload_ps(fg + i, k), ag));
            _mm256_maskstore_ps(fb + i, k, _mm256_add_ps(_mm256_maskload_ps(fb + i, k), dy));
        }
    }
}
static inline __attribute__((always_inline)) int sums_vec_f32(
        const float *xr, const float *dyr, const float *gamma, int64_t n, float m, float inv, float th,
        const int topk, const int cols, float *fg, float *fb, float *out) {
    const __m256 mv = _mm256_set1_ps(m), iv = _mm256_set1_ps(inv), tv = _mm256_set1_ps(th), z = _mm256_setzero_ps();
    const __m256i all = _mm256_set1_epi32(-1);
    struct vsums8 s = {z, z, z, z, z};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) sums_step8_f32(&s, xr, dyr, gamma, i, 1, all, mv, iv, tv, topk, cols, fg, fb);
    if (i < n) {
        const __m256i k = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - i)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        sums_step8_f32(&s, xr, dyr, gamma, i, 0, k, mv, iv, tv, topk, cols, fg, fb);
    }
    /* lanes 0-3 and 4-7 of {a1, a2, a3, b1} and {c1} summed pairwise, then the two halves */
    const __m256 q = _mm256_hadd_ps(_mm256_hadd_ps(s.a1, s.a2), _mm256_hadd_ps(s.a3, s.b1));
    const __m256 c = _mm256_hadd_ps(_mm256_hadd_ps(s.c1, z), z);
    const __m128 t = _mm_add_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1));
    out[0] = _mm_cvtss_f32(t);
    out[1] = _mm_cvtss_f32(_mm_shuffle_ps(t, t, 1));
    out[2] = _mm_cvtss_f32(_mm_shuffle_ps(t, t, 2));
    out[3] = topk ? _mm_cvtss_f32(_mm_shuffle_ps(t, t, 3)) : 0.0f;
    out[4] = topk ? _mm256_cvtss_f32(c) + _mm_cvtss_f32(_mm256_extractf128_ps(c, 1)) : 0.0f;
    return 1;
}
#else
static inline int sums_vec_f32(const float *xr, const float *dyr, const float *gamma, int64_t n, float m, float inv,
                               float th, const int topk, const int cols, float *fg, float *fb, float *out) {
    (void)xr; (void)dyr; (void)gamma; (void)n; (void)m; (void)inv; (void)th; (void)topk; (void)cols;
    (void)fg; (void)fb; (void)out;
    return 0;
}
#endif
static inline int sums_vec_f64(const double *xr, const double *dyr, const double *gamma, int64_t n, double m,
                               double inv, double th, const int topk, const int cols, double *fg, double *fb,
                               double *out) {   /* (float64: the caller's loop) */
    (void)xr; (void)dyr; (void)gamma; (void)n; (void)m; (void)inv; (void)th; (void)topk; (void)cols;
    (void)fg; (void)fb; (void)out;
    return 0;
}

#define NS_ROWS_AT_ONCE 4   /* rows of rows_topk_f32 taken one step at a time (measured: 2 and 8 slower) */
#if defined(__AVX512F__)
/* Selection in registers for float32 with AVX-512 (k <= 16). The forward needs of a row
 * only the sum of its k largest |v| and the k-th largest (which copy of a tied value is
 * among the k largest is the backward's question, answered there), so nothing here ranks
 * ties. */

/* For each lane p of v: how many lanes hold a larger value (15 rotations of v). */
static inline __m512i gt_counts16(__m512 v) {
    const __m512i vi = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
    __m512i cnt = _mm512_setzero_si512();
#define NS_ROT(r) cnt = _mm512_mask_add_epi32(cnt, _mm512_cmp_ps_mask(v, \
        _mm512_castsi512_ps(_mm512_alignr_epi32(vi, vi, r)), _CMP_LT_OQ), cnt, one);
    NS_ROT(1) NS_ROT(2) NS_ROT(3) NS_ROT(4) NS_ROT(5) NS_ROT(6) NS_ROT(7) NS_ROT(8)
    NS_ROT(9) NS_ROT(10) NS_ROT(11) NS_ROT(12) NS_ROT(13) NS_ROT(14) NS_ROT(15)
#undef NS_ROT
    return cnt;
}

/* The k-th largest of the lanes `in` of v (at least k of them), gt their counts of larger
 * lanes; with `sum`, the sum of the k largest into *sum. The lanes with fewer than k
 * larger ones are the values above the k-th largest and every copy of it: the k-th
 * largest is their minimum, the sum theirs less the surplus copies. */
static inline float kth_of_counts(__m512 v, __m512i gt, __mmask16 in, int64_t k, float *sum) {
    __mmask16 sel = _mm512_cmp_epi32_mask(gt, _mm512_set1_epi32((int)k), _MM_CMPINT_LT) & in;
    float th = _mm512_mask_reduce_min_ps(sel, v);
    if (sum) *sum = _mm512_mask_reduce_add_ps(sel, v) - (float)(__builtin_popcount(sel) - k) * th;
    return th;
}

/* The k largest of c candidates cv[0..c) (values >= 0, k <= c <= 32) held in one or two
 * registers: *sum their sum, *thr the k-th largest; the counts by rotations for c <= 16,
 * else one broadcast candidate at a time. Returns 0 where c > 32 (the caller ranks them). */
static int rank_small_f32(const float *cv, int64_t c, int64_t k, float *sum, float *thr) {
    if (c > 32) return 0;
    const __m512 none = _mm512_set1_ps(-1.0f);
    if (c <= 16) {
        __mmask16 in = (__mmask16)((1u << c) - 1u);
        __m512 v = _mm512_mask_loadu_ps(none, in, cv);
        *thr = kth_of_counts(v, gt_counts16(v), in, k, sum);
        return 1;
    }
    __mmask16 in1 = (__mmask16)(c >= 32 ? 0xFFFFu : (1u << (c - 16)) - 1u);
    const __m512 v0 = _mm512_loadu_ps(cv), v1 = _mm512_mask_loadu_ps(none, in1, cv + 16);
    const __m512i one = _mm512_set1_epi32(1), kk = _mm512_set1_epi32((int)k);
    __m512i r0 = _mm512_setzero_si512(), r1 = r0;
    for (int64_t q = 0; q < c; q++) {
        const __m512 b = _mm512_set1_ps(cv[q]);
        r0 = _mm512_mask_add_epi32(r0, _mm512_cmp_ps_mask(v0, b, _CMP_LT_OQ), r0, one);
        r1 = _mm512_mask_add_epi32(r1, _mm512_cmp_ps_mask(v1, b, _CMP_LT_OQ), r1, one);
    }
    __mmask16 s0 = _mm512_cmp_epi32_mask(r0, kk, _MM_CMPINT_LT);
    __mmask16 s1 = _mm512_cmp_epi32_mask(r1, kk, _MM_CMPINT_LT) & in1;
    float lo0 = s0 ? _mm512_mask_reduce_min_ps(s0, v0) : INFINITY;
    float lo1 = s1 ? _mm512_mask_reduce_min_ps(s1, v1) : INFINITY;
    float th = lo0 < lo1 ? lo0 : lo1;
    *thr = th;
    *sum = _mm512_mask_reduce_add_ps(s0, v0) + _mm512_mask_reduce_add_ps(s1, v1)
           - (float)(__builtin_popcount(s0) + __builtin_popcount(s1) - k) * th;
    return 1;
}

/* Lane l: the largest of the interleaved subset a[l], a[l + 16], ... of a[0..n) (n >= 32;
 * two maxima chains). */
static inline __m512 lane_max_f32(const float *a, int64_t n) {
    const __m512 none = _mm512_set1_ps(-1.0f);
    __m512 mx0 = none, mx1 = none;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        mx0 = _mm512_max_ps(mx0, _mm512_loadu_ps(a + i));
        mx1 = _mm512_max_ps(mx1, _mm512_loadu_ps(a + i + 16));
    }
    if (i + 16 <= n) { mx0 = _mm512_max_ps(mx0, _mm512_loadu_ps(a + i)); i += 16; }
    if (i < n) mx1 = _mm512_max_ps(mx1, _mm512_mask_loadu_ps(none, (__mmask16)((1u << (n - i)) - 1u), a + i));
    return _mm512_max_ps(mx0, mx1);
}

/* dev_sum_f32(x, n, 0, 0) (the same four partial sums, the same result), and into *hi, *lo
 * the largest and smallest value of each interleaved subset x[l], x[l + 16], ... (n >= 32):
 * max(*hi - m, m - *lo) is then each subset's largest |x - m| (rounding is monotone). */
static inline float sum_range_f32(const float *x, int64_t n, __m512 *hi, __m512 *lo) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    __m512 h0 = _mm512_set1_ps(-INFINITY), h1 = h0, l0 = _mm512_set1_ps(INFINITY), l1 = l0;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        const __m512 v0 = _mm512_loadu_ps(x + i), v1 = _mm512_loadu_ps(x + i + 16);
        const __m512 v2 = _mm512_loadu_ps(x + i + 32), v3 = _mm512_loadu_ps(x + i + 48);
        s0 = _mm512_add_ps(s0, v0); s1 = _mm512_add_ps(s1, v1);
        s2 = _mm512_add_ps(s2, v2); s3 = _mm512_add_ps(s3, v3);
        h0 = _mm512_max_ps(h0, _mm512_max_ps(v0, v1)); h1 = _mm512_max_ps(h1, _mm512_max_ps(v2, v3));
        l0 = _mm512_min_ps(l0, _mm512_min_ps(v0, v1)); l1 = _mm512_min_ps(l1, _mm512_min_ps(v2, v3));
    }
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        s0 = _mm512_add_ps(s0, v); h0 = _mm512_max_ps(h0, v); l0 = _mm512_min_ps(l0, v);
    }
    if (i < n) {
        const __mmask16 tail = (__mmask16)((1u << (n - i)) - 1u);
        const __m512 v = _mm512_maskz_loadu_ps(tail, x + i);
        s1 = _mm512_mask_add_ps(s1, tail, s1, v);
        h1 = _mm512_mask_max_ps(h1, tail, h1, v); l1 = _mm512_mask_min_ps(l1, tail, l1, v);
    }
    *hi = _mm512_max_ps(h0, h1);
    *lo = _mm512_min_ps(l0, l1);
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

/* The candidates for the k largest |x - m| of x[0..n) (k <= 16), given mx (lane l: the
 * largest |x - m| of the subset x[l], x[l + 16], ...; lane_max_f32 of |v| or sum_range_f32):
 * the lane maxima are values of 16 disjoint subsets, so their k-th
 * largest, tau, is at most the row's k-th largest; the values at or above it (about k + a
 * few for Gaussian rows) are packed into cv a vector at a time (register compress, then a
 * full store: cv needs 16 values of room past the candidates). Returns their count, or -1
 * (a NaN: no order). */
static inline int64_t pack_candidates_f32(const float *x, float m, int64_t n, int64_t k, __m512 mx, float *cv) {
    const float tau = kth_of_counts(mx, gt_counts16(mx), 0xFFFF, k, NULL);
    if (!(tau >= 0.0f)) return -1;
    const __m512 mv = _mm512_set1_ps(m), t = _mm512_set1_ps(tau);
    int64_t c = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_abs_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), mv));
        __mmask16 ge = _mm512_cmp_ps_mask(v, t, _CMP_GE_OQ);
        _mm512_storeu_ps(cv + c, _mm512_maskz_compress_ps(ge, v));
        c += __builtin_popcount(ge);
    }
    if (i < n) {
        const __mmask16 tail = (__mmask16)((1u << (n - i)) - 1u);
        __m512 v = _mm512_abs_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, x + i), mv));
        __mmask16 ge = _mm512_cmp_ps_mask(v, t, _CMP_GE_OQ) & tail;
        _mm512_storeu_ps(cv + c, _mm512_maskz_compress_ps(ge, v));
        c += __builtin_popcount(ge);
    }
    return c;
}

/* The candidates of values a that are already |v| (m = 0); -1 where this does not apply. */
static int64_t candidates_f32(const float *a, int64_t n, int64_t k, float *cv) {
    if (k > 16 || n < 32) return -1;
    return pack_candidates_f32(a, 0.0f, n, k, lane_max_f32(a, n), cv);
}
static const int fast_candidates_f32 = 1;   /* (candidates_f32 applies, for k <= 16) */

/* The selection of nb <= NS_ROWS_AT_ONCE contiguous rows x[j * n .. (j + 1) * n), read
 * from x itself (no copy), one step at a time over the rows (their means, then their lane
 * maxima, candidates, ranks), so that the rows' chains of dependent steps overlap: row j's
 * mean[j] (dev_sum_f32), and the sum of its k largest |x - mean| into sum[j] and the k-th
 * largest into thr[j] (pack_candidates_f32, rank_small_f32). ok[j] = 0 where this does not
 * apply (k > 16, n < 32, a NaN or inf, more than 32 candidates): the caller then takes the
 * general path for that row. cv: nb * (n + 16) of scratch. */
static void rows_topk_f32(const float *x, int64_t nb, int64_t n, int64_t k, float *cv, float *mean,
                          float *sum, float *thr, int *ok) {
    __m512 mx[NS_ROWS_AT_ONCE];
    int64_t c[NS_ROWS_AT_ONCE];
    const int fits = k <= 16 && n >= 32;
    if (!fits) {
        for (int64_t j = 0; j < nb; j++) ok[j] = 0;
        return;
    }
    for (int64_t j = 0; j < nb; j++) {   /* the mean, and each lane's largest |x - mean| from its extremes */
        __m512 hi, lo;
        mean[j] = (float)((double)sum_range_f32(x + j * n, n, &hi, &lo) / (double)n);   /* (= row_mean_) */
        ok[j] = isfinite(mean[j]);
        const __m512 mv = _mm512_set1_ps(mean[j]);
        mx[j] = _mm512_max_ps(_mm512_sub_ps(hi, mv), _mm512_sub_ps(mv, lo));
    }
    for (int64_t j = 0; j < nb; j++)
        c[j] = ok[j] ? pack_candidates_f32(x + j * n, mean[j], n, k, mx[j], cv + j * (n + 16)) : -1;
    for (int64_t j = 0; j < nb; j++)
        ok[j] = c[j] >= k && rank_small_f32(cv + j * (n + 16), c[j], k, sum + j, thr + j);
}
#else
static int rank_small_f32(const float *cv, int64_t c, int64_t k, float *sum, float *thr) {
    (void)cv; (void)c; (void)k; (void)sum; (void)thr;
    return 0;
}
static int64_t candidates_f32(const float *a, int64_t n, int64_t k, float *cv) {
    (void)a; (void)n; (void)k; (void)cv;
    return -1;
}
static const int fast_candidates_f32 = 0;
static void rows_topk_f32(const float *x, int64_t nb, int64_t n, int64_t k, float *cv, float *mean,
                          float *sum, float *thr, int *ok) {
    (void)x; (void)n; (void)k; (void)cv; (void)mean; (void)sum; (void)thr;
    for (int64_t j = 0; j < nb; j++) ok[j] = 0;
}
#endif
/* (float64: none of the above; the general path) */
static int rank_small_f64(const double *cv, int64_t c, int64_t k, double *sum, double *thr) {
    (void)cv; (void)c; (void)k; (void)sum; (void)thr;
    return 0;
}
static int64_t candidates_f64(const double *a, int64_t n, int64_t k, double *cv) {
    (void)a; (void)n; (void)k; (void)cv;
    return -1;
}
static const int fast_candidates_f64 = 0;
static void rows_topk_f64(const double *x, int64_t nb, int64_t n, int64_t k, double *cv, double *mean,
                          double *sum, double *thr, int *ok) {
    (void)x; (void)n; (void)k; (void)cv; (void)mean; (void)sum; (void)thr;
    for (int64_t j = 0; j < nb; j++) ok[j] = 0;
}

#define NS_COL_BLOCK 256   /* positions per partial column sum (cols_impl.h) */

/* tot[j] = the sum over blocks b of part[b w + j], j < w, added block by block (the column
 * kernels' sums: the same bits whatever the thread count that filled part) */
static void ns_add_blocks(const double *part, int64_t nb, int64_t w, double *tot) {
    for (int64_t j = 0; j < w; j++) tot[j] = 0;
    for (int64_t b = 0; b < nb; b++) {
        const double *o = part + b * w;
#pragma omp simd
        for (int64_t j = 0; j < w; j++) tot[j] += o[j];
    }
}

#include "tiles.h"

#define T float
#define SUF f32
#define ABS fabsf
#define NEXTAFTER nextafterf
#if defined(__AVX__)
#define NS_V8_IN_REGISTER 1   /* rows_impl.h's vectors of eight values are one register */
#else
#define NS_V8_IN_REGISTER 0
#endif
#include "rows_impl.h"
#include "cols_impl.h"
#undef T
#undef SUF
#undef ABS
#undef NEXTAFTER
#undef NS_V8_IN_REGISTER

#define T double
#define SUF f64
#define ABS fabs
#define NEXTAFTER nextafter
#define NS_V8_IN_REGISTER 0   /* (eight doubles: two AVX registers) */
#include "rows_impl.h"
#include "cols_impl.h"
#undef T
#undef SUF
#undef ABS
#undef NEXTAFTER
#undef NS_V8_IN_REGISTER

#include "newton.h"
#include "divisive.h"
#include "whiten.h"
#include "bwn.h"
