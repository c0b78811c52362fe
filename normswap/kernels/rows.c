/* normswap row kernels: standardization of the rows of a contiguous (R, n) array.
 *
 * One row is one group of values that share statistics (layer, channels, group and
 * instance areas, laid out as in normswap/norms/areas.py). For each row r, with
 * v = x - mu and mu = mean(x):
 *
 *   STAT_L2    d = sqrt(mean(v^2) + delta)
 *   STAT_L1    d = C_L1 * mean(|v|) + eps
 *   STAT_TOPK  d = cinf * (mean of the k largest |v|) + eps
 *
 *   y = v / d * gamma[c] + beta[c],  c = ((r * n + i) / S) % Cq
 *
 * S = 1 with Cq = n: gamma varies along the row ("vector" recovery: layer norm);
 * S > 1 dividing n: gamma is constant on segments of S values ("segment" recovery:
 * group norm, instance norm). gamma / beta NULL: 1 / 0.
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

/* One definition per element type T (float, double). */
#define DEFINE_KERNELS(T, SUF, ABS)                                                              \
                                                                                            \
/* min-heap of (value, index) on value; ties: the earlier index stays on top */             \
static void sift_down_##SUF(T *hv, int32_t *hi, int64_t k, int64_t p) {                      \
    for (;;) {                                                                              \
        int64_t l = 2 * p + 1, s = p;                                                       \
        if (l < k && hv[l] < hv[s]) s = l;                                                  \
        if (l + 1 < k && hv[l + 1] < hv[s]) s = l + 1;                                      \
        if (s == p) return;                                                                 \
        T tv = hv[p]; hv[p] = hv[s]; hv[s] = tv;                                            \
        int32_t ti = hi[p]; hi[p] = hi[s]; hi[s] = ti;                                      \
        p = s;                                                                              \
    }                                                                                       \
}                                                                                           \
                                                                                            \
/* the k largest a[i] = |x[i] - m| of a row: their sum, their positions into idx.         \
 * tau = the smallest of the maxima of k disjoint (strided) blocks is at most the k-th     \
 * largest value (the k maxima are k values >= tau), so the top k are among the values     \
 * >= tau, a short list for rows much longer than k: the k largest of that list are found  \
 * by counting, for each, the values above it (ties: the earlier position wins), or by a   \
 * heap when the list is long. a, cv: n values of scratch; cand: n positions; hv: k. */     \
static T topk_row_##SUF(const T *xr, int64_t n, T m, int64_t k, T *a, T *cv, int32_t *cand, \
                        T *hv, int32_t *idx) {                                              \
    _Pragma("omp simd")                                                                     \
    for (int64_t i = 0; i < n; i++) a[i] = ABS(xr[i] - m);                                  \
    for (int64_t j = 0; j < k; j++) {                                                       \
        int64_t lo = n * j / k, hi = n * (j + 1) / k;                                       \
        T mx = a[lo];                                                                       \
        if (hi - lo < 64) {   /* short blocks: the vector loop's set-up costs more */       \
            for (int64_t i = lo + 1; i < hi; i++) mx = a[i] > mx ? a[i] : mx;               \
        } else {                                                                            \
            _Pragma("omp simd reduction(max:mx)")                                           \
            for (int64_t i = lo + 1; i < hi; i++) mx = a[i] > mx ? a[i] : mx;               \
        }                                                                                   \
        hv[j] = mx;                                                                         \
    }                                                                                       \
    T tau = hv[0];                                                                          \
    for (int64_t j = 1; j < k; j++) tau = hv[j] < tau ? hv[j] : tau;                        \
    int64_t c = 0;                                                                          \
    for (int64_t i0 = 0; i0 < n; i0 += 16) {                                                \
        int64_t i1 = i0 + 16 < n ? i0 + 16 : n;                                             \
        int any = 0;                                                                        \
        _Pragma("omp simd reduction(|:any)")                                                \
        for (int64_t i = i0; i < i1; i++) any |= a[i] >= tau;                               \
        if (!any) continue;                                                                 \
        for (int64_t i = i0; i < i1; i++) { cand[c] = (int32_t)i; cv[c] = a[i]; c += a[i] >= tau; } \
    }                                                                                       \
    T s = 0;                                                                                \
    if (c > 2 * k) {   /* the same bound again on the (shorter) list: fewer to rank */     \
        T tau2 = 0;                                                                         \
        for (int64_t j = 0; j < k; j++) {                                                   \
            int64_t lo = c * j / k, hi = c * (j + 1) / k;                                   \
            T mx = cv[lo];                                                                  \
            for (int64_t i = lo + 1; i < hi; i++) mx = cv[i] > mx ? cv[i] : mx;             \
            tau2 = j == 0 || mx < tau2 ? mx : tau2;                                         \
        }                                                                                   \
        int64_t c2 = 0;                                                                     \
        for (int64_t i = 0; i < c; i++) { cand[c2] = cand[i]; cv[c2] = cv[i]; c2 += cv[i] >= tau2; } \
        c = c2;                                                                             \
    }                                                                                       \
    if (c <= 256) {   /* above[p] = #{q : cv[q] > cv[p], or equal and q < p} */            \
        int32_t above[256];                                                                 \
        for (int64_t p = 0; p < c; p++) above[p] = 0;                                       \
        for (int64_t q = 0; q < c; q++) {                                                   \
            T aq = cv[q];                                                                   \
            _Pragma("omp simd")                                                             \
            for (int64_t p = 0; p < c; p++)                                                 \
                above[p] += (aq > cv[p]) | ((aq == cv[p]) & (q < p));                       \
        }                                                                                   \
        int64_t out = 0;                                                                    \
        for (int64_t p = 0; p < c; p++)                                                     \
            if (above[p] < k) { idx[out++] = cand[p]; s += cv[p]; }                         \
        return s;                                                                           \
    }                                                                                       \
    for (int64_t i = 0; i < k; i++) { hv[i] = cv[i]; idx[i] = cand[i]; }                    \
    for (int64_t p = k / 2 - 1; p >= 0; p--) sift_down_##SUF(hv, idx, k, p);                \
    for (int64_t i = k; i < c; i++) {                                                       \
        if (cv[i] > hv[0]) { hv[0] = cv[i]; idx[0] = cand[i]; sift_down_##SUF(hv, idx, k, 0); } \
    }                                                                                       \
    for (int64_t i = 0; i < k; i++) s += hv[i];                                             \
    return s;                                                                               \
}                                                                                           \
                                                                                            \
int ns_forward_##SUF(const T *x, int64_t R, int64_t n, int stat, int64_t k, double cinf,      \
                     double eps, double delta, const T *gamma, const T *beta, int64_t S,     \
                     int64_t Cq, int need_mad, T *y, T *mu, T *dout, T *mad, T *bstat,       \
                     int32_t *idx, int nthreads) {                                          \
    int failed = 0;                                                                         \
    _Pragma("omp parallel num_threads(nthreads)")                                           \
    {                                                                                       \
        T *hv = NULL;                                                                       \
        if (stat == STAT_TOPK) {   /* scratch: a, cv (n each), hv (k), cand (n) */         \
            hv = (T *)malloc(sizeof(T) * (size_t)(2 * n + k) + sizeof(int32_t) * (size_t)n); \
            if (!hv) failed = 1;                                                            \
        }                                                                                   \
        int t = thread_id(), nt = thread_count();                                           \
        int64_t r0 = R * t / nt, r1 = R * (t + 1) / nt;                                     \
        for (int64_t r = r0; r < r1 && !(stat == STAT_TOPK && !hv); r++) {                   \
            const T *xr = x + r * n;                                                        \
            T *yr = y + r * n;                                                              \
            T s1 = 0;                                                                       \
            _Pragma("omp simd reduction(+:s1)")                                             \
            for (int64_t i = 0; i < n; i++) s1 += xr[i];                                    \
            T m = s1 / (T)n;                                                                \
            T sa = 0, sq = 0, dd, bs;                                                       \
            if (stat == STAT_L1 || need_mad) {                                              \
                _Pragma("omp simd reduction(+:sa)")                                         \
                for (int64_t i = 0; i < n; i++) sa += ABS(xr[i] - m);                   \
            }                                                                               \
            if (stat == STAT_L2) {                                                          \
                _Pragma("omp simd reduction(+:sq)")                                         \
                for (int64_t i = 0; i < n; i++) { T v = xr[i] - m; sq += v * v; }           \
                bs = sq / (T)n;                                                             \
                dd = (T)sqrt((double)bs + delta);                                           \
            } else if (stat == STAT_L1) {                                                   \
                bs = sa / (T)n;                                                             \
                dd = (T)(C_L1 * (double)bs + eps);                                          \
            } else {                                                                        \
                T sk = topk_row_##SUF(xr, n, m, k, hv + k, hv + k + n, (int32_t *)(hv + k + 2 * n), hv, idx + r * k) / (T)k;                 \
                bs = (T)(cinf * (double)sk);                                                \
                dd = (T)(cinf * (double)sk + eps);                                          \
            }                                                                               \
            mu[r] = m; dout[r] = dd; bstat[r] = bs;                                         \
            if (mad) mad[r] = sa / (T)n;                                                    \
            T inv = (T)1 / dd;                                                              \
            if (S == 1) {                                                                   \
                if (gamma && beta) {                                                        \
                    _Pragma("omp simd")                                                     \
                    for (int64_t i = 0; i < n; i++) yr[i] = (xr[i] - m) * inv * gamma[i] + beta[i]; \
                } else if (gamma) {                                                         \
                    _Pragma("omp simd")                                                     \
                    for (int64_t i = 0; i < n; i++) yr[i] = (xr[i] - m) * inv * gamma[i];   \
                } else if (beta) {                                                          \
                    _Pragma("omp simd")                                                     \
                    for (int64_t i = 0; i < n; i++) yr[i] = (xr[i] - m) * inv + beta[i];    \
                } else {                                                                    \
                    _Pragma("omp simd")                                                     \
                    for (int64_t i = 0; i < n; i++) yr[i] = (xr[i] - m) * inv;              \
                }                                                                           \
            } else {                                                                        \
                for (int64_t j = 0; j < n; j += S) {                                        \
                    int64_t c = ((r * n + j) / S) % Cq;                                     \
                    T sc = gamma ? inv * gamma[c] : inv;                                    \
                    T sh = beta ? beta[c] : (T)0;                                           \
                    _Pragma("omp simd")                                                     \
                    for (int64_t i = j; i < j + S; i++) yr[i] = (xr[i] - m) * sc + sh;      \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        free(hv);                                                                           \
    }                                                                                       \
    return failed;                                                                          \
}                                                                                           \
                                                                                            \
/* Gradients. With g = dy * gamma[c], S_g = sum(g), S_gv = sum(g * v), dL/dd = -S_gv / d^2: \
 *   dx = g / d - S_g / (n d) + dL/dd * (dd/dv - mean(dd/dv)) + gmad / n * (sign(v) - mean(sign(v)))
 * dd/dv: L2 v / (n d); L1 C_L1 sign(v) / n; TOPK cinf sign(v) / k at the top-k positions.  \
 * dgamma[c] += sum(dy * v) / d and dbeta[c] += sum(dy) over the values of channel c;       \
 * dldd[r] = dL/dd (for the gradient of delta). */                                          \
int ns_backward_##SUF(const T *x, const T *dy, int64_t R, int64_t n, int stat, int64_t k,     \
                      double cinf, const T *mu, const T *dd_, const T *gamma, int64_t S,     \
                      int64_t Cq, const int32_t *idx, const T *gmad, T *dx, double *dgamma,  \
                      double *dbeta, T *dldd, int nthreads) {                                \
    int failed = 0;                                                                         \
    int want_cols = dgamma != NULL || dbeta != NULL;                                        \
    double *parts = NULL;                                                                   \
    int np = nthreads > 0 ? nthreads : 1;                                                   \
    if (want_cols) {                                                                        \
        parts = (double *)calloc((size_t)np * 2 * (size_t)Cq, sizeof(double));              \
        if (!parts) return 1;                                                               \
    }                                                                                       \
    int used = 1;                                                                           \
    _Pragma("omp parallel num_threads(np)")                                                 \
    {                                                                                       \
        int t = thread_id(), nt = thread_count();                                           \
        if (t == 0) used = nt;                                                              \
        double *pg = parts ? parts + (size_t)t * 2 * (size_t)Cq : NULL;                     \
        double *pb = parts ? pg + Cq : NULL;                                                \
        int64_t r0 = R * t / nt, r1 = R * (t + 1) / nt;                                     \
        int need_sign = stat == STAT_L1 || gmad != NULL;                                    \
        for (int64_t r = r0; r < r1; r++) {                                                 \
            const T *xr = x + r * n, *dyr = dy + r * n;                                     \
            T *dxr = dx + r * n;                                                            \
            T m = mu[r], d = dd_[r], inv = (T)1 / d;                                        \
            T sg = 0, sgv = 0, ss = 0;                                                      \
            if (S == 1) {                                                                   \
                _Pragma("omp simd reduction(+:sg,sgv,ss)")                                  \
                for (int64_t i = 0; i < n; i++) {                                           \
                    T v = xr[i] - m;                                                        \
                    T g = gamma ? dyr[i] * gamma[i] : dyr[i];                               \
                    sg += g; sgv += g * v; ss += SIGN(v);                                   \
                }                                                                           \
                if (pg) {                                                                   \
                    _Pragma("omp simd")                                                     \
                    for (int64_t i = 0; i < n; i++) {                                       \
                        pg[i] += (double)(dyr[i] * (xr[i] - m) * inv);                      \
                        pb[i] += (double)dyr[i];                                            \
                    }                                                                       \
                }                                                                           \
            } else {                                                                        \
                for (int64_t j = 0; j < n; j += S) {                                        \
                    int64_t c = ((r * n + j) / S) % Cq;                                     \
                    T rdy = 0, rdyv = 0, rs = 0;                                            \
                    _Pragma("omp simd reduction(+:rdy,rdyv,rs)")                            \
                    for (int64_t i = j; i < j + S; i++) {                                   \
                        T v = xr[i] - m;                                                    \
                        rdy += dyr[i]; rdyv += dyr[i] * v; rs += SIGN(v);                   \
                    }                                                                       \
                    T gc = gamma ? gamma[c] : (T)1;                                         \
                    sg += gc * rdy; sgv += gc * rdyv; ss += rs;                             \
                    if (pg) { pg[c] += (double)(rdyv * inv); pb[c] += (double)rdy; }        \
                }                                                                           \
            }                                                                               \
            T c0 = -sg * inv / (T)n;                                                        \
            T dl = -sgv / (d * d);                                                          \
            T cv = 0, cs = 0, tc = 0;                                                       \
            if (stat == STAT_L2) cv = dl / ((T)n * d);                                      \
            if (stat == STAT_L1) cs = dl * (T)C_L1 / (T)n;                                  \
            if (gmad) cs += gmad[r] / (T)n;                                                 \
            if (need_sign) c0 -= cs * ss / (T)n;                                            \
            if (stat == STAT_TOPK) {                                                        \
                const int32_t *ir = idx + r * k;                                            \
                T ts = 0;                                                                   \
                tc = dl * (T)cinf / (T)k;                                                   \
                for (int64_t j = 0; j < k; j++) ts += SIGN(xr[ir[j]] - m);                  \
                c0 -= tc * ts / (T)n;                                                       \
            }                                                                               \
            if (dldd) dldd[r] = dl;                                                         \
            if (S == 1) {                                                                   \
                _Pragma("omp simd")                                                         \
                for (int64_t i = 0; i < n; i++) {                                           \
                    T v = xr[i] - m;                                                        \
                    T g = gamma ? dyr[i] * gamma[i] : dyr[i];                               \
                    dxr[i] = g * inv + c0 + cv * v + (need_sign ? cs * SIGN(v) : (T)0);     \
                }                                                                           \
            } else {                                                                        \
                for (int64_t j = 0; j < n; j += S) {                                        \
                    int64_t c = ((r * n + j) / S) % Cq;                                     \
                    T gi = gamma ? gamma[c] * inv : inv;                                    \
                    _Pragma("omp simd")                                                     \
                    for (int64_t i = j; i < j + S; i++) {                                   \
                        T v = xr[i] - m;                                                    \
                        dxr[i] = dyr[i] * gi + c0 + cv * v + (need_sign ? cs * SIGN(v) : (T)0); \
                    }                                                                       \
                }                                                                           \
            }                                                                               \
            if (stat == STAT_TOPK) {                                                        \
                const int32_t *ir = idx + r * k;                                            \
                for (int64_t j = 0; j < k; j++) dxr[ir[j]] += tc * SIGN(xr[ir[j]] - m);     \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    if (parts) {                                                                            \
        for (int t = 0; t < used; t++) {                                                    \
            const double *pg = parts + (size_t)t * 2 * (size_t)Cq, *pb = pg + Cq;           \
            for (int64_t c = 0; c < Cq; c++) {                                              \
                if (dgamma) dgamma[c] += pg[c];                                             \
                if (dbeta) dbeta[c] += pb[c];                                               \
            }                                                                               \
        }                                                                                   \
        free(parts);                                                                        \
    }                                                                                       \
    return failed;                                                                          \
}

DEFINE_KERNELS(float, f32, fabsf)
DEFINE_KERNELS(double, f64, fabs)
