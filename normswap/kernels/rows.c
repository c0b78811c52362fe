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
#ifdef _OPENMP
#include <omp.h>
#endif

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

/* The values of a[0..n) that are >= tau, in order, into cv; returns how many. Most of a
 * long row is below tau, so it is read a vector at a time and only vectors holding a
 * candidate are looked into: with AVX-512 by the comparison's bit mask, else by a
 * vector "any" test and a branch-free copy. */
#if defined(__AVX512F__)
#include <immintrin.h>
static int64_t scan_ge_f32(const float *a, int64_t n, float tau, float *cv) {
    const __m512 t = _mm512_set1_ps(tau);
    int64_t c = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
        __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(a + i), t, _CMP_GE_OQ);
        while (m) { cv[c++] = a[i + __builtin_ctz(m)]; m &= (__mmask16)(m - 1); }
    }
    for (; i < n; i++) { cv[c] = a[i]; c += a[i] >= tau; }
    return c;
}
static int64_t scan_ge_f64(const double *a, int64_t n, double tau, double *cv) {
    const __m512d t = _mm512_set1_pd(tau);
    int64_t c = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        __mmask8 m = _mm512_cmp_pd_mask(_mm512_loadu_pd(a + i), t, _CMP_GE_OQ);
        while (m) { cv[c++] = a[i + __builtin_ctz(m)]; m &= (__mmask8)(m - 1); }
    }
    for (; i < n; i++) { cv[c] = a[i]; c += a[i] >= tau; }
    return c;
}
#else
#define SCAN_GE_GENERIC(T, SUF)                                                     \
    static int64_t scan_ge_##SUF(const T *a, int64_t n, T tau, T *cv) {             \
        int64_t c = 0;                                                              \
        for (int64_t i0 = 0; i0 < n; i0 += 16) {                                    \
            int64_t i1 = i0 + 16 < n ? i0 + 16 : n;                                 \
            int any = 0;                                                            \
            _Pragma("omp simd reduction(|:any)")                                    \
            for (int64_t i = i0; i < i1; i++) any |= a[i] >= tau;                   \
            if (!any) continue;                                                     \
            for (int64_t i = i0; i < i1; i++) { cv[c] = a[i]; c += a[i] >= tau; }   \
        }                                                                           \
        return c;                                                                   \
    }
SCAN_GE_GENERIC(float, f32)
SCAN_GE_GENERIC(double, f64)
#endif

#if defined(__AVX512F__) && !defined(NS_NO_FAST_CANDIDATES)
/* A tighter start for long rows (k <= 16, n >= 32): the maxima of the 16 interleaved
 * subsets a[l], a[l + 16], ... are values of disjoint subsets, so the k-th largest of them
 * is at most the row's k-th largest; the values at or above it (about k + a few for
 * Gaussian rows) are packed into cv a vector at a time (register compress, then a full
 * store: cv needs 16 values of room past the candidates). Returns the count, or -1 where
 * this does not apply. */
static int64_t candidates_f32(const float *a, int64_t n, int64_t k, float *cv) {
    if (k > 16 || n < 32) return -1;
    const __m512 none = _mm512_set1_ps(-1.0f);
    __m512 mx = none;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(a + i));
    __mmask16 tail = (__mmask16)((1u << (n - i)) - 1u);
    if (i < n) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(none, tail, a + i));
    float m[16], tau = -1.0f;
    _mm512_storeu_ps(m, mx);
    for (int j = 0; j < 16; j++) {   /* m[j] is the k-th largest when k - 1 rank above it */
        __mmask16 above = _mm512_cmp_ps_mask(mx, _mm512_set1_ps(m[j]), _CMP_GT_OQ);
        __mmask16 tied = _mm512_cmp_ps_mask(mx, _mm512_set1_ps(m[j]), _CMP_EQ_OQ) & (__mmask16)((1u << j) - 1u);
        if (__builtin_popcount(above) + __builtin_popcount(tied) == k - 1) { tau = m[j]; break; }
    }
    if (!(tau >= 0.0f)) return -1;   /* (NaN: no order; the general path reports it) */
    const __m512 t = _mm512_set1_ps(tau);
    int64_t c = 0;
    for (i = 0; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(a + i);
        __mmask16 ge = _mm512_cmp_ps_mask(v, t, _CMP_GE_OQ);
        _mm512_storeu_ps(cv + c, _mm512_maskz_compress_ps(ge, v));
        c += __builtin_popcount(ge);
    }
    for (; i < n; i++) { cv[c] = a[i]; c += a[i] >= tau; }
    return c;
}
static const int fast_candidates_f32 = 1;   /* (candidates_f32 applies, for k <= 16) */
#else
static int64_t candidates_f32(const float *a, int64_t n, int64_t k, float *cv) {
    (void)a; (void)n; (void)k; (void)cv;
    return -1;
}
static const int fast_candidates_f32 = 0;
#endif
static int64_t candidates_f64(const double *a, int64_t n, int64_t k, double *cv) {   /* (none) */
    (void)a; (void)n; (void)k; (void)cv;
    return -1;
}
static const int fast_candidates_f64 = 0;

#define T float
#define SUF f32
#define ABS fabsf
#define NEXTAFTER nextafterf
#include "rows_impl.h"
#undef T
#undef SUF
#undef ABS
#undef NEXTAFTER

#define T double
#define SUF f64
#define ABS fabs
#define NEXTAFTER nextafter
#include "rows_impl.h"
#undef T
#undef SUF
#undef ABS
#undef NEXTAFTER
