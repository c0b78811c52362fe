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
