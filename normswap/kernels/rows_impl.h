/* The kernels of rows.c for one element type: included once per type with
 *   T    the element type          SUF  the name suffix        ABS  |.| for T
 * defined (see the end of rows.c). Layout and formulas: rows.c.
 */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUF)

/* min-heap of values */
static void FN(sift_down_)(T *hv, int64_t k, int64_t p) {
    for (;;) {
        int64_t l = 2 * p + 1, s = p;
        if (l < k && hv[l] < hv[s]) s = l;
        if (l + 1 < k && hv[l + 1] < hv[s]) s = l + 1;
        if (s == p) return;
        T tv = hv[p]; hv[p] = hv[s]; hv[s] = tv;
        p = s;
    }
}

/* Smallest of the maxima of k blocks of a[0..n) (k <= n): at most the k-th largest
 * value, since the k block maxima are k values that are all >= it. */
static T FN(block_bound_)(const T *a, int64_t n, int64_t k) {
    int64_t bq = n / k, br = n % k, lo = 0;   /* br blocks of bq + 1 values, then bq */
    T tau = 0;
    for (int64_t j = 0; j < k; j++) {
        int64_t hi = lo + bq + (j < br);
        T mx = a[lo];
        if (hi - lo < 64) {   /* short blocks: the vector loop's set-up costs more */
            for (int64_t i = lo + 1; i < hi; i++) mx = a[i] > mx ? a[i] : mx;
        } else {
#pragma omp simd reduction(max:mx)
            for (int64_t i = lo + 1; i < hi; i++) mx = a[i] > mx ? a[i] : mx;
        }
        tau = j == 0 || mx < tau ? mx : tau;
        lo = hi;
    }
    return tau;
}

/* The k largest of a[0..n): returns their sum, *thr = the k-th largest. A bound leaves a
 * short list of candidates: up to 32 are ranked in registers (rank_small_, float32 with
 * AVX-512); otherwise the bound is taken again on the list (about 1.4 k for long rows after
 * a few rounds), then they are ranked by counting the values above each (ties: the earlier
 * position wins), or by a heap when the list is long. cv: n + 16 values of scratch; hv: k.
 * NaN in the row: NaN. */
static T FN(topk_)(const T *a, int64_t n, int64_t k, T *cv, T *hv, T *thr) {
    int64_t c = FN(candidates_)(a, n, k, cv);
    if (c < 0) c = FN(scan_ge_)(a, n, FN(block_bound_)(a, n, k), cv);
    *thr = (T)NAN;
    if (c < k) return (T)NAN;   /* only a row holding NaN (no order): its result is NaN */
    T s = 0, lo = 0;
    if (FN(rank_small_)(cv, c, k, &s, thr)) return s;
    for (int round = 0; round < 4 && c > k + k / 4 + 1; round++) {   /* the bound again on the list */
        int64_t before = c, c2 = 0;
        T tau2 = FN(block_bound_)(cv, c, k);
        for (int64_t i = 0; i < c; i++) { cv[c2] = cv[i]; c2 += cv[i] >= tau2; }
        c = c2;
        if (c == before) break;
    }
    if (c <= 256) {   /* above[p] = #{q : cv[q] > cv[p], or equal and q < p} */
        int32_t above[256];
        for (int64_t p = 0; p < c; p++) above[p] = 0;
        for (int64_t q = 0; q < c; q++) {
            T aq = cv[q];
#pragma omp simd
            for (int64_t p = 0; p < c; p++) above[p] += (aq > cv[p]) | ((aq == cv[p]) & (q < p));
        }
        int first = 1;
        for (int64_t p = 0; p < c; p++)
            if (above[p] < k) { s += cv[p]; lo = first || cv[p] < lo ? cv[p] : lo; first = 0; }
        *thr = lo;
        return s;
    }
    for (int64_t i = 0; i < k; i++) hv[i] = cv[i];
    for (int64_t p = k / 2 - 1; p >= 0; p--) FN(sift_down_)(hv, k, p);
    for (int64_t i = k; i < c; i++)
        if (cv[i] > hv[0]) { hv[0] = cv[i]; FN(sift_down_)(hv, k, 0); }
    for (int64_t i = 0; i < k; i++) s += hv[i];
    *thr = hv[0];
    return s;
}

#define NS_LANES 16         /* rows selected side by side (top-k on short rows, or their candidates) */
#ifndef NS_LANES_MAX_NK_FAST
#define NS_LANES_MAX_NK_FAST 400    /* ... or this where rows_topk_ applies (float32, AVX-512; measured) */
#endif
#define NS_FLUSH 32         /* layer rows whose column sums (dgamma, dbeta) are added in T first */
#define NS_MEANS_AHEAD 16   /* rows whose means the backward computes before their sums (overlapping) */
#ifndef NS_LANES_MAX_NK
#define NS_LANES_MAX_NK 4096   /* ... when a row's n * k is at most this */
#endif
#define NS_LANES_CANDIDATES_MAX_N 4096   /* ... their candidates (lanes_candidates_), rows of up to this */

/* The k largest |a - m[l]| of each of B = NS_LANES rows side by side, a[i * B + l] value i
 * of row l: b[j * B + l] holds the j-th largest of row l so far (-1: none yet; b[-B..-1] and
 * b[-2B..-B-1] are +inf guards). Values go in two at a time, hi >= lo, by the merge of two
 * sorted lists: b[j] = max(b[j], min(b[j - 1], hi), min(b[j - 2], lo)), j = k - 1 .. 0:
 * k independent steps (no chain through the values, half the stores of one at a time),
 * each a vector loop over the B rows. b: k * B, with the 2 B guards before it. */
static void FN(lanes_insert_)(const T *a, int64_t n, int64_t k, const T *m, T *b) {
    T hi[NS_LANES], lo[NS_LANES];
    for (int64_t j = 0; j < k * NS_LANES; j++) b[j] = (T)-1;
    for (int64_t j = 1; j <= 2 * NS_LANES; j++) b[-j] = (T)INFINITY;
    for (int64_t i = 0; i < n; i += 2) {
        const T *a1 = a + i * NS_LANES, *a2 = i + 1 < n ? a1 + NS_LANES : a1;
        T none = i + 1 < n ? (T)1 : (T)0;   /* odd n: the last value alone (lo = -1) */
#pragma omp simd
        for (int l = 0; l < NS_LANES; l++) {
            T e1 = ABS(a1[l] - m[l]), e2 = none > 0 ? ABS(a2[l] - m[l]) : (T)-1;
            hi[l] = e1 > e2 ? e1 : e2;
            lo[l] = e1 > e2 ? e2 : e1;
        }
        for (int64_t j = k - 1; j >= 0; j--) {
            T *bj = b + j * NS_LANES;
            const T *b1 = bj - NS_LANES, *b2 = bj - 2 * NS_LANES;
#pragma omp simd
            for (int l = 0; l < NS_LANES; l++) {
                T u = b1[l] < hi[l] ? b1[l] : hi[l], w = b2[l] < lo[l] ? b2[l] : lo[l];
                T x0 = bj[l] > u ? bj[l] : u;
                bj[l] = x0 > w ? x0 : w;
            }
        }
    }
}

/* Of B = NS_LANES rows' k largest |v| in descending order (b[j * B + l] the j-th of row l:
 * lanes_insert_'s or top16_lanes_'s), sum[l] their sum (in that order) and thr[l] the k-th. */
static void FN(lanes_topk_sums_)(const T *b, int64_t k, T *sum, T *thr) {
    for (int l = 0; l < NS_LANES; l++) sum[l] = 0;
    for (int64_t j = 0; j < k; j++) {
#pragma omp simd
        for (int l = 0; l < NS_LANES; l++) sum[l] += b[j * NS_LANES + l];
    }
    for (int l = 0; l < NS_LANES; l++) thr[l] = b[(k - 1) * NS_LANES + l];
}

/* channel of the recovery for values [j, j + S) of slice p of row r (segment recovery) */
static inline int64_t FN(channel_)(int64_t P, int64_t r, int64_t n, int64_t j, int64_t S, int64_t Cq) {
    return P == 1 ? ((r * n + j) / S) % Cq : r % Cq;
}

static int FN(cmp_desc_)(const void *a, const void *b) {
    const T u = *(const T *)a, v = *(const T *)b;
    return (u < v) - (u > v);
}

/* a[0 .. n) (no NaN) reordered so that a[j] is its (j + 1)-th largest value, the values
 * before it at least as large and those after at most as large (quickselect) */
static void FN(select_desc_)(T *a, int64_t n, int64_t j) {
    int64_t lo = 0, hi = n - 1;
    while (hi > lo) {
        T p0 = a[lo], p1 = a[lo + (hi - lo) / 2], p2 = a[hi], p;   /* the median of three */
        p = p0 > p1 ? (p1 > p2 ? p1 : (p0 > p2 ? p2 : p0)) : (p0 > p2 ? p0 : (p1 > p2 ? p2 : p1));
        int64_t i = lo, r = hi;
        while (i <= r) {
            while (a[i] > p) i++;
            while (a[r] < p) r--;
            if (i <= r) { T t = a[i]; a[i] = a[r]; a[r] = t; i++; r--; }
        }
        if (j <= r) hi = r;
        else if (j >= i) lo = i;
        else return;
    }
}

/* a[0 .. n) sorted in descending order (insertion sort where short) */
static void FN(sort_desc_)(T *a, int64_t n) {
    if (n > 64) { qsort(a, (size_t)n, sizeof(T), FN(cmp_desc_)); return; }
    for (int64_t i = 1; i < n; i++) {
        T v = a[i];
        int64_t j = i;
        for (; j > 0 && a[j - 1] < v; j--) a[j] = a[j - 1];
        a[j] = v;
    }
}

/* Eight values as one vector (GCC's vector extensions; the compiler left the scalar form of
 * the loops below scalar), and lane-wise a > b ? a : b, a < b ? a : b (the scalar selects:
 * a NaN in a is not taken). */
typedef T FN(v8_) __attribute__((vector_size(8 * sizeof(T))));
static inline FN(v8_) FN(load8_)(const T *x) {
    FN(v8_) v;
    memcpy(&v, x, sizeof v);
    return v;
}
static inline FN(v8_) FN(select8_)(FN(v8_) a, FN(v8_) b, const int larger) {
#if defined(__AVX__)
    if (sizeof(T) == 4) {   /* vmaxps / vminps are these selects exactly (NaN, signed zeros): one instruction, not three */
        __m256 u, w;
        memcpy(&u, &a, sizeof u);
        memcpy(&w, &b, sizeof w);
        u = larger ? _mm256_max_ps(u, w) : _mm256_min_ps(u, w);
        memcpy(&a, &u, sizeof u);
        return a;
    }
#endif
    __typeof__(a > b) m = larger ? a > b : a < b;
    return (FN(v8_))(((__typeof__(m))a & m) | ((__typeof__(m))b & ~m));
}
static inline FN(v8_) FN(max8_)(FN(v8_) a, FN(v8_) b) { return FN(select8_)(a, b, 1); }
static inline FN(v8_) FN(min8_)(FN(v8_) a, FN(v8_) b) { return FN(select8_)(a, b, 0); }
/* one block of eight values into the partial sums p and the lane extremes hi, lo */
static inline void FN(take8_)(FN(v8_) v, FN(v8_) *p, FN(v8_) *hi, FN(v8_) *lo) {
    *p += v;
    *hi = FN(max8_)(v, *hi);
    *lo = FN(min8_)(v, *lo);
}
/* the portable dev_sum_'s last step: its eight partial sums and the tail's sum added */
static inline T FN(add8_)(FN(v8_) p, T t) {
    return (((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]))) + t;
}

/* The sum of x[0 .. Q) (the eight partial sums of the portable dev_sum_, added in its
 * order) and its largest and smallest values (NaN is not kept: a row holding one has a NaN
 * mean). */
static T FN(sum_extremes_)(const T *x, int64_t Q, T *mx, T *mn) {
    FN(v8_) p = {0}, hi = p + x[0], lo = hi;
    T t = 0, h = x[0], l = x[0];
    int64_t i = 0;
    for (; i + 8 <= Q; i += 8) FN(take8_)(FN(load8_)(x + i), &p, &hi, &lo);
    for (; i < Q; i++) { t += x[i]; h = x[i] > h ? x[i] : h; l = x[i] < l ? x[i] : l; }
    for (int j = 0; j < 8; j++) { h = hi[j] > h ? hi[j] : h; l = lo[j] < l ? lo[j] : l; }
    *mx = h; *mn = l;
    return FN(add8_)(p, t);
}

/* The same sum, and into hi / lo the largest and smallest value of each of 16 disjoint
 * subsets of x[0..n) (n >= 16): the blocks of eight values go to subsets 0-7 and 8-15 in
 * turn, the last n % 8 values to subset 0. */
static T FN(sum_extremes16_)(const T *x, int64_t n, T *hi, T *lo) {
    FN(v8_) p = {0}, ha = FN(load8_)(x), la = ha, hb = FN(load8_)(x + 8), lb = hb;
    T t = 0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {   /* (the blocks in order: the sum's order is dev_sum_'s) */
        FN(take8_)(FN(load8_)(x + i), &p, &ha, &la);
        FN(take8_)(FN(load8_)(x + i + 8), &p, &hb, &lb);
    }
    if (i + 8 <= n) {
        FN(take8_)(FN(load8_)(x + i), &p, &ha, &la);
        i += 8;
    }
    for (; i < n; i++) {
        t += x[i];
        ha[0] = x[i] > ha[0] ? x[i] : ha[0];
        la[0] = x[i] < la[0] ? x[i] : la[0];
    }
    memcpy(hi, &ha, sizeof ha);
    memcpy(hi + 8, &hb, sizeof hb);
    memcpy(lo, &la, sizeof la);
    memcpy(lo + 8, &lb, sizeof lb);
    return FN(add8_)(p, t);
}

/* Top-k of row r where the AVX-512 selection is not compiled, given its mean and the
 * largest |x - mean| of each of np >= k disjoint parts of it (smax, reordered): their k-th
 * largest, tau, is at most the row's k-th largest |x - mean|, and one pass over the row
 * collects the values with |x - mean| >= tau (about k to 2 k on Gaussian input) for topk_.
 * Instead of copying |x - m| (a pass writing n values) and two passes over the copy.
 * Returns the sum of the k largest |x - mean| and sets *thr. a: scratch of topk_'s size
 * (n + NS_ROWS_AT_ONCE (n + B) + k); smax may be in a's first np values. */
static T FN(topk_above_bound_)(const T *x, int64_t P, int64_t R, int64_t Q, int64_t r, int64_t k, T mean,
                               T *smax, int64_t np, T *a, T *thr) {
    *thr = (T)NAN;
    if (!isfinite(mean)) return (T)NAN;
    FN(select_desc_)(smax, np, k - 1);
    const T tau = smax[k - 1];
    int64_t c = 0;
    for (int64_t p = 0; p < P; p++)   /* (the candidates overwrite smax) */
        c += FN(pack_ge_)(x + (p * R + r) * Q, Q, mean, 1, tau, a + c, 0);
    if (c < k) return (T)NAN;   /* (only with NaN in the row) */
    const int64_t n = P * Q;
    return FN(topk_)(a, c, k, a + n, a + 2 * n + NS_LANES, thr);
}

/* Whether bounded_topk_ applies to rows of P slices of Q values: in the portable build
 * (dev_sum_ adds in sum_extremes_'s and sum_extremes16_'s order; that build has no AVX-512
 * selection either), with at least k slices, or one of at least 32 values and k <= 16 */
static int FN(bounded_topk_applies_)(int64_t P, int64_t Q, int64_t k) {
    return NS_PORTABLE_SUMS && (P > 1 ? P >= k : k <= 16 && Q >= 32);
}

/* smax[p * stride] = the largest |x - mean| of part p (p < np), from its largest and smallest
 * values mx[p], mn[p] (rounding is monotone: the same as the largest of its values' |x - mean|) */
static void FN(largest_deviations_)(const T *mx, const T *mn, int64_t np, T mean, T *smax, int64_t stride) {
    for (int64_t p = 0; p < np; p++) {
        const T hi = mx[p] - mean, lo = mean - mn[p];
        smax[p * stride] = hi > lo ? hi : lo;
    }
}

/* src's B = NS_LANES rows of n values (row l at l * ld) side by side: dst[i * B + l] */
static void FN(lanes_of_)(const T *src, int64_t ld, int64_t n, T *dst) {
    CAT(ns_transpose_, SUF)(src, ld, dst, NS_LANES, NS_LANES, n);
}

/* Batcher's odd-even merge sort of 16 values as a list of compare-exchanges (a, b): after
 * them, in order, value a >= value b for each pair leaves the 16 sorted in descending order
 * (checked on every 0/1 input, which suffices for a sorting network) */
#ifndef NS_SORT16_
#define NS_SORT16_   /* (this file is included once per precision) */
static const int8_t ns_sort16_[63][2] = {
    {0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}, {12, 13}, {14, 15}, {0, 2}, {1, 3}, {4, 6},
    {5, 7}, {8, 10}, {9, 11}, {12, 14}, {13, 15}, {1, 2}, {5, 6}, {9, 10}, {13, 14}, {0, 4}, {1, 5},
    {2, 6}, {3, 7}, {8, 12}, {9, 13}, {10, 14}, {11, 15}, {2, 4}, {3, 5}, {10, 12}, {11, 13}, {1, 2},
    {3, 4}, {5, 6}, {9, 10}, {11, 12}, {13, 14}, {0, 8}, {1, 9}, {2, 10}, {3, 11}, {4, 12}, {5, 13},
    {6, 14}, {7, 15}, {4, 8}, {5, 9}, {6, 10}, {7, 11}, {2, 4}, {3, 5}, {6, 8}, {7, 9}, {10, 12},
    {11, 13}, {1, 2}, {3, 4}, {5, 6}, {7, 8}, {9, 10}, {11, 12}, {13, 14}};
#endif

/* (The short rows' candidates go through top16_lanes_ where eight values are one register,
 * NS_V8_IN_REGISTER (rows.c: float32 with AVX), else through lanes_insert_: its 16 vectors
 * of eight values need 16 registers; with SSE, or eight doubles, they spill and the forward
 * was 1.5-3.3x slower, measured.)
 *
 * The 16 largest of each lane of a[i * B + l], i < n, B = NS_LANES, in descending order into
 * top[j * B + l] (lanes short of 16 values padded with zeros: for values >= 0). Eight lanes
 * at a time in vector registers: the first 16 values sorted by ns_sort16_ (63
 * compare-exchanges), then each further value e inserted, t[j] = max(t[j], min(t[j - 1], e))
 * from j = 15 down. For top-k with k <= 16: about a quarter of lanes_insert_'s operations on
 * 16-24 values, which keeps its k sorted in memory. */
static void FN(top16_lanes_)(const T *a, int64_t n, T *top) {
    enum { W = 8 };
    for (int l0 = 0; l0 < NS_LANES; l0 += W) {
        FN(v8_) v[16], zero = {0};
        for (int p = 0; p < 16; p++) v[p] = p < n ? FN(load8_)(a + p * NS_LANES + l0) : zero;
#pragma GCC unroll 63
        for (int c = 0; c < 63; c++) {
            const FN(v8_) u = v[ns_sort16_[c][0]], w = v[ns_sort16_[c][1]];
            v[ns_sort16_[c][0]] = FN(max8_)(u, w);
            v[ns_sort16_[c][1]] = FN(min8_)(u, w);
        }
        for (int64_t i = 16; i < n; i++) {
            const FN(v8_) e = FN(load8_)(a + i * NS_LANES + l0);
#pragma GCC unroll 16
            for (int j = 15; j > 0; j--) v[j] = FN(max8_)(v[j], FN(min8_)(v[j - 1], e));
            v[0] = FN(max8_)(v[0], e);
        }
        for (int p = 0; p < 16; p++) memcpy(top + p * NS_LANES + l0, &v[p], sizeof v[0]);
    }
}

/* The lanes' input (a[i * B + l], B = NS_LANES) for rows rb .. rb + nb - 1 where
 * bounded_topk_applies_ (1, n, k): instead of a row's n values, the deviations |x - m| >= tau
 * of its candidates, padded with zeros to the longest list. tau is bounded_topk_'s bound: the
 * k-th largest of the largest deviations of the 16 subsets that sum_extremes16_'s pass finds
 * with the mean, here for the B rows at once: the rows' passes first (independent of each
 * other, they overlap), the means as one vector loop, the extremes turned side by side by
 * register tiles, the deviations sorted by top16_lanes_ (branch-free; a quickselect a row
 * cost 15% of the forward, the per-row mean and deviations 10%). A zero displaces no
 * candidate: a finite row has at least k of them, none below 0. The candidates are packed
 * without branches (most of a short row's vectors hold one) into cand (rows ld apart: n
 * rounded up to 8, plus 8 of slack for the zeros' whole-vector stores) and go into the lanes
 * by register tiles. On Gaussian rows the lists are about 13 long (18 the longest of 16
 * rows) whatever n. Lanes past nb repeat row rb + nb - 1, as in the plain lanes. Returns the
 * lists' length (a is written up to it rounded up to a whole tile); m: the means (row_mean_'s:
 * the portable sums add in dev_sum_'s order; a row without a finite mean gets no candidates). */
static int64_t FN(lanes_candidates_)(const T *x, int64_t rb, int64_t nb, int64_t n, int64_t k, T *m, T *cand,
                                     int64_t ld, T *a) {
    T hi[NS_LANES * 16], lo[NS_LANES * 16], sum[NS_LANES];   /* row l's subsets' extremes at l * 16 */
    T his[16 * NS_LANES], los[16 * NS_LANES];                /* ... side by side: subset p at p * B */
    const T *xr[NS_LANES];
    for (int64_t l = 0; l < NS_LANES; l++) {
        xr[l] = x + (rb + (l < nb ? l : nb - 1)) * n;
        sum[l] = FN(sum_extremes16_)(xr[l], n, hi + l * 16, lo + l * 16);
    }
#pragma omp simd
    for (int64_t l = 0; l < NS_LANES; l++) m[l] = (T)((double)sum[l] / (double)n);
    FN(lanes_of_)(hi, 16, 16, his);
    FN(lanes_of_)(lo, 16, 16, los);
    for (int64_t p = 0; p < 16; p++) {   /* the subsets' largest |x - m| (largest_deviations_), into his */
        T *hp = his + p * NS_LANES;
        const T *lp = los + p * NS_LANES;
#pragma omp simd
        for (int64_t l = 0; l < NS_LANES; l++) {
            const T above = hp[l] - m[l], below = m[l] - lp[l];
            hp[l] = above > below ? above : below;
        }
    }
    T sorted[(2 + 16) * NS_LANES], zero[NS_LANES] = {0};   /* (lanes_insert_'s 2 B guards first) */
    if (NS_V8_IN_REGISTER) FN(top16_lanes_)(his, 16, sorted + 2 * NS_LANES);
    else FN(lanes_insert_)(his, 16, k, zero, sorted + 2 * NS_LANES);
    const T *bound = sorted + (2 + k - 1) * NS_LANES;   /* (the k-th largest) */
    int64_t count[NS_LANES], len = 0;
    for (int64_t l = 0; l < NS_LANES; l++) {
        count[l] = isfinite(m[l]) ? FN(pack_ge_)(xr[l], n, m[l], 1, bound[l], cand + l * ld, 1) : 0;
        len = count[l] > len ? count[l] : len;
    }
    const int64_t tile = CAT(NS_TILE_, SUF), padded = (len + tile - 1) / tile * tile;
    for (int64_t l = 0; l < NS_LANES; l++)   /* (8 zeros a store: gcc made the loop a memset call) */
        for (int64_t i = count[l]; i < padded; i += 8) memset(cand + l * ld + i, 0, 8 * sizeof(T));
    FN(lanes_of_)(cand, ld, padded, a);
    return len;
}

/* Top-k of row r by topk_above_bound_ (where bounded_topk_applies_): the parts are the P
 * slices (the batch area), or for one slice 16 interleaved subsets of it, their extremes
 * found in the mean's pass. Returns the sum of the k largest |x - m|, sets *m and *thr. */
static T FN(bounded_topk_)(const T *x, int64_t P, int64_t R, int64_t Q, int64_t r, int64_t k, T *a, T *m,
                           T *thr) {
    const int64_t np = P > 1 ? P : 16;
    T *mx = a, *mn = a + np, *smax = a + 2 * np;
    double s1 = 0;
    if (P > 1)
        for (int64_t p = 0; p < P; p++) s1 += FN(sum_extremes_)(x + (p * R + r) * Q, Q, mx + p, mn + p);
    else
        s1 = FN(sum_extremes16_)(x + r * Q, Q, mx, mn);
    const T mean = (T)(s1 / (double)(P * Q));
    *m = mean;
    FN(largest_deviations_)(mx, mn, np, mean, smax, 1);
    return FN(topk_above_bound_)(x, P, R, Q, r, k, mean, smax, np, a, thr);
}

static T FN(row_mean_)(const T *x, int64_t P, int64_t R, int64_t Q, int64_t r) {
    double s1 = 0;
    for (int64_t p = 0; p < P; p++) {
        const T *xs = x + (p * R + r) * Q;
        s1 += FN(dev_sum_)(xs, Q, 0, 0);
    }
    return (T)(s1 / (double)(P * Q));
}

/* The means of B = NS_LANES contiguous rows of n values, x + l * n (lanes l >= nb repeat row
 * nb - 1), each bit for bit as row_mean_ computes it where NS_PORTABLE_SUMS (dev_sum_'s eight
 * partial sums, their tree, then in double / n): eight rows' partial sums accumulate at once,
 * the trees and the divisions run over the rows side by side. (The backward of short top-k
 * rows, which keep no means: 0.94-0.95x on rows of 64 values, 0.87-0.92x on rows of 128,
 * once its reads ahead had taken the wait on memory out of this pass. Compiled only where
 * eight values are one register: eight rows of eight doubles, or SSE's halves, spill, 1.05x
 * and 1.24x slower measured; with the code present but not called, the float64 backward
 * measured 1.06x slower too, from the function's changed layout.) */
#if NS_V8_IN_REGISTER
static void FN(lanes_means_)(const T *x, int64_t n, int64_t nb, T *m) {
    T ps[NS_LANES * 8], q[8 * NS_LANES], t[NS_LANES];   /* row l's partial sums at l * 8; side by side */
    const int64_t n8 = n / 8 * 8;
    for (int l0 = 0; l0 < NS_LANES; l0 += 8) {
        FN(v8_) p[8];
        const T *xr[8];
        for (int l = 0; l < 8; l++) {
            xr[l] = x + (l0 + l < nb ? l0 + l : nb - 1) * n;
            p[l] = (FN(v8_)){0};
        }
        for (int64_t i = 0; i < n8; i += 8)
            for (int l = 0; l < 8; l++) p[l] += FN(load8_)(xr[l] + i);
        for (int l = 0; l < 8; l++) {
            memcpy(ps + (l0 + l) * 8, &p[l], sizeof p[l]);
            t[l0 + l] = 0;
            for (int64_t i = n8; i < n; i++) t[l0 + l] += xr[l][i];
        }
    }
    FN(lanes_of_)(ps, 8, 8, q);
#pragma omp simd
    for (int l = 0; l < NS_LANES; l++) {
        const T *c = q + l;
        const T s = (((c[0] + c[NS_LANES]) + (c[2 * NS_LANES] + c[3 * NS_LANES]))
                     + ((c[4 * NS_LANES] + c[5 * NS_LANES]) + (c[6 * NS_LANES] + c[7 * NS_LANES]))) + t[l];
        m[l] = (T)((0.0 + (double)s) / (double)n);   /* (row_mean_'s double sum starts at 0) */
    }
}
#endif

/* The rest of row r's forward, once its mean m (and for top-k the mean sk of its k largest
 * |v|) is known: the scale statistic, d, the outputs. */
static void FN(row_finish_)(const T *x, int64_t P, int64_t R, int64_t Q, int64_t r, int stat, double cinf,
                            double eps, double delta, const T *gamma, const T *beta, int64_t S, int64_t Cq,
                            int need_mad, T m, T sk, T *y, T *mu, T *dout, T *mad, T *bstat) {
    const int64_t n = P * Q;
    double sa = 0, sq = 0;
    T dd, bs;
    if (stat == STAT_L1 || need_mad) {
        for (int64_t p = 0; p < P; p++) {
            const T *xs = x + (p * R + r) * Q;
            sa += FN(dev_sum_)(xs, Q, m, 1);
        }
    }
    if (stat == STAT_L2) {
        for (int64_t p = 0; p < P; p++) {
            const T *xs = x + (p * R + r) * Q;
            sq += FN(dev_sum_)(xs, Q, m, 2);
        }
        bs = (T)(sq / (double)n);
        dd = (T)sqrt((double)bs + delta);
    } else if (stat == STAT_L1) {
        bs = (T)(sa / (double)n);
        dd = (T)(C_L1 * (double)bs + eps);
    } else {
        bs = (T)(cinf * (double)sk);
        dd = (T)(cinf * (double)sk + eps);
    }
    mu[r] = m; dout[r] = dd; bstat[r] = bs;
    if (mad) mad[r] = (T)(sa / (double)n);
    T inv = (T)1 / dd;
    if (P == 1 && S == 1) {   /* gamma along the row */
        const T *xr = x + r * n;
        T *yr = y + r * n;
        if (gamma && beta) {
#pragma omp simd
            for (int64_t i = 0; i < n; i++) yr[i] = (xr[i] - m) * inv * gamma[i] + beta[i];
        } else if (gamma) {
#pragma omp simd
            for (int64_t i = 0; i < n; i++) yr[i] = (xr[i] - m) * inv * gamma[i];
        } else if (beta) {
#pragma omp simd
            for (int64_t i = 0; i < n; i++) yr[i] = (xr[i] - m) * inv + beta[i];
        } else {
#pragma omp simd
            for (int64_t i = 0; i < n; i++) yr[i] = (xr[i] - m) * inv;
        }
    } else {
        for (int64_t p = 0; p < P; p++) {
            const T *xs = x + (p * R + r) * Q;
            T *ys = y + (p * R + r) * Q;
            for (int64_t j = 0; j < Q; j += S) {
                int64_t c = FN(channel_)(P, r, n, j, S, Cq);
                T sc = gamma ? inv * gamma[c] : inv;
                T sh = beta ? beta[c] : (T)0;
#pragma omp simd
                for (int64_t i = j; i < j + S; i++) ys[i] = (xs[i] - m) * sc + sh;
            }
        }
    }
}

int FN(ns_forward_)(const T *x, int64_t P, int64_t R, int64_t Q, int stat, int64_t k, double cinf,
                    double eps, double delta, const T *gamma, const T *beta, int64_t S, int64_t Cq,
                    int need_mad, T *y, T *mu, T *dout, T *mad, T *bstat, T *thr, int nthreads) {
    const int64_t n = P * Q;
    int failed = 0;
    if (P > 1) S = Q;   /* several slices per row: the recovery is per row (batch area) */
    /* top-k on contiguous rows: NS_LANES rows at a time (the lanes), short rows, or any row
     * whose candidates lanes_candidates_ can collect */
    const int fast = FN(fast_candidates_) && k <= 16;
    /* (with the candidates the lanes' cost hardly depends on n: measured 0.54x the one-row
     * path's forward on rows of 600, 0.91-0.97x on rows of 4096; 1.02-1.03x on rows of
     * 8192-16384, whose 16 rows no longer stay in cache between the two passes) */
    const int lane_candidates = stat == STAT_TOPK && P == 1 && n <= NS_LANES_CANDIDATES_MAX_N
                                && FN(bounded_topk_applies_)(1, n, k);
    const int lanes = lane_candidates
                      || (stat == STAT_TOPK && P == 1 && n * k <= (fast ? NS_LANES_MAX_NK_FAST : NS_LANES_MAX_NK));
    const int64_t nl = (n + 7) / 8 * 8, ld = nl + 8;   /* the lanes' rows of values: whole tiles; cand's rows */
    const int64_t kb = lane_candidates && NS_V8_IN_REGISTER ? 16 : k;   /* the lanes' rows of largest values */
#pragma omp parallel num_threads(nthreads)
    {
        T *a = NULL;
        if (stat == STAT_TOPK) {   /* scratch: lanes: a (nl * B), guards (2 B), b (kb * B), lanes_candidates_'s
                                    * cand (ld * B); else a (n), then cv (n + B) and hv (k), or rows_topk_'s
                                    * cv (NS_ROWS_AT_ONCE (n + B)) */
            a = (T *)ns_thread_scratch(sizeof(T) * (size_t)(lanes ? (nl + lane_candidates * ld + kb + 2) * NS_LANES
                                                                 : n + NS_ROWS_AT_ONCE * (n + NS_LANES) + k),
                                       0, &failed);
        }
        int t = thread_id(), nt = thread_count();
        int64_t r0 = R * t / nt, r1 = R * (t + 1) / nt;
        if (stat == STAT_TOPK && !a) r1 = r0;
        if (lanes) {
            for (int64_t rb = r0; rb < r1; rb += NS_LANES) {
                int64_t nb = r1 - rb < NS_LANES ? r1 - rb : NS_LANES;
                T m[NS_LANES], sk[NS_LANES], th[NS_LANES], zero[NS_LANES] = {0};
                int64_t len = n;
                if (lane_candidates)
                    len = FN(lanes_candidates_)(x, rb, nb, n, k, m, a + (nl + kb + 2) * NS_LANES, ld, a);
                else
                    for (int64_t l = 0; l < NS_LANES; l++) {   /* the rows side by side (past nb: row nb - 1) */
                        const int64_t r = rb + (l < nb ? l : nb - 1);
                        const T *xr = x + r * n;
                        m[l] = FN(row_mean_)(x, 1, R, Q, r);   /* (as every path computes it: see ns_backward_) */
                        for (int64_t i = 0; i < n; i++) a[i * NS_LANES + l] = xr[i];
                    }
                T *b = a + (nl + 2) * NS_LANES;   /* (the candidates are |v| already; k <= 16 there) */
                if (lane_candidates && NS_V8_IN_REGISTER) FN(top16_lanes_)(a, len, b);
                else FN(lanes_insert_)(a, len, k, lane_candidates ? zero : m, b);
                FN(lanes_topk_sums_)(b, k, sk, th);
                for (int64_t l = 0; l < nb; l++) {
                    int finite = isfinite(m[l]);   /* (a NaN would not stay in the lanes' maxima) */
                    thr[rb + l] = finite ? th[l] : (T)NAN;
                    FN(row_finish_)(x, 1, R, Q, rb + l, stat, cinf, eps, delta, gamma, beta, S, Cq, need_mad,
                                    m[l], finite ? sk[l] / (T)k : (T)NAN, y, mu, dout, mad, bstat);
                }
            }
        } else {
            /* top-k on contiguous rows: NS_ROWS_AT_ONCE rows selected from x itself where
             * rows_topk_ applies; otherwise (and for a row it leaves) |v| copied to a and
             * ranked by topk_ */
            const int64_t step = stat == STAT_TOPK && P == 1 ? NS_ROWS_AT_ONCE : 1;
            for (int64_t rb = r0; rb < r1; rb += step) {
                const int64_t nb = r1 - rb < step ? r1 - rb : step;
                T bm[NS_ROWS_AT_ONCE] = {0}, bs[NS_ROWS_AT_ONCE] = {0}, bt[NS_ROWS_AT_ONCE] = {0};
                int ok[NS_ROWS_AT_ONCE] = {0};
                if (step > 1) FN(rows_topk_)(x + rb * n, nb, n, k, a + n, bm, bs, bt, ok);
                for (int64_t r = rb; r < rb + nb; r++) {
                    T m, sk = 0;
                    if (ok[r - rb]) {
                        m = bm[r - rb]; sk = bs[r - rb] / (T)k; thr[r] = bt[r - rb];
                    } else if (stat == STAT_TOPK && FN(bounded_topk_applies_)(P, Q, k)) {
                        sk = FN(bounded_topk_)(x, P, R, Q, r, k, a, &m, thr + r) / (T)k;
                    } else {
                        m = FN(row_mean_)(x, P, R, Q, r);
                        if (stat == STAT_TOPK) {
                            for (int64_t p = 0; p < P; p++) {
                                const T *xs = x + (p * R + r) * Q;
                                T *as = a + p * Q;
#pragma omp simd
                                for (int64_t i = 0; i < Q; i++) as[i] = ABS(xs[i] - m);
                            }
                            sk = FN(topk_)(a, n, k, a + n, a + 2 * n + NS_LANES, thr + r) / (T)k;
                            if (!isfinite(m)) { sk = (T)NAN; thr[r] = (T)NAN; }
                        }
                    }
                    FN(row_finish_)(x, P, R, Q, r, stat, cinf, eps, delta, gamma, beta, S, Cq, need_mad, m, sk,
                                    y, mu, dout, mad, bstat);
                }
            }
        }
        free(a);
    }
    return failed;
}

/* The backward sums of n values of a row (a layer row, gamma along it, or a slice segment
 * of one channel, gamma NULL), with v = x - m and g = dy * gamma: sum g, sum g v,
 * sum sign(v), and for top-k (`topk`) how many |v| >= th and the sum of their signs; with
 * `cols` it also adds dy v inv and dy into the columns' sums fg, fb.
 * `topk` and `cols` are constants at every call: inlined, each call is its own vector loop
 * (an `if (fg)` inside one loop became masked stores, and int and float sums mixed in one
 * loop kept it scalar, hence the count in T). */
struct FN(sums_) { T g, gv, sign, sign_ge, count_ge; };

/* (the portable loop; has_gamma a constant, so that each copy is one vector loop without a
 * branch: `gamma ? ... : ...` inside it kept the layer rows' copies scalar) */
static inline __attribute__((always_inline)) struct FN(sums_) FN(row_sums_loop_)(
        const T *xr, const T *dyr, const T *gamma, const int has_gamma, int64_t n, T m, T inv, T th,
        const int topk, const int cols, T *fg, T *fb) {
    T a1 = 0, a2 = 0, a3 = 0, b1 = 0, c1 = 0;
#pragma omp simd reduction(+:a1,a2,a3,b1,c1)
    for (int64_t i = 0; i < n; i++) {
        T v = xr[i] - m;
        T g = has_gamma ? dyr[i] * gamma[i] : dyr[i];
        T sv = v > 0 ? (T)1 : v < 0 ? (T)-1 : (T)0;   /* (selects: SIGN's int results kept some copies scalar) */
        a1 += g; a2 += g * v; a3 += sv;
        if (topk) { T ge = ABS(v) >= th ? (T)1 : (T)0; c1 += ge; b1 += ge * sv; }
        if (cols) { fg[i] += dyr[i] * v * inv; fb[i] += dyr[i]; }
    }
    struct FN(sums_) out = {a1, a2, a3, b1, c1};
    return out;
}

static inline __attribute__((always_inline)) struct FN(sums_) FN(row_sums_)(
        const T *xr, const T *dyr, const T *gamma, int64_t n, T m, T inv, T th, const int topk,
        const int cols, T *fg, T *fb) {
    T vs[5];
    if (FN(sums_vec_)(xr, dyr, gamma, n, m, inv, th, topk, cols, fg, fb, vs)) {
        struct FN(sums_) out = {vs[0], vs[1], vs[2], vs[3], vs[4]};
        return out;
    }
    return gamma ? FN(row_sums_loop_)(xr, dyr, gamma, 1, n, m, inv, th, topk, cols, fg, fb)
                 : FN(row_sums_loop_)(xr, dyr, NULL, 0, n, m, inv, th, topk, cols, fg, fb);
}

/* The first `count` values of row r (in row order: slice by slice) with |x - m| == th: the
 * sum of their signs, and with dx, add * sign(v) added to their dx (the tied k-th place of
 * a top-k row, a rare path). */
static double FN(first_ties_)(const T *x, T *dx, int64_t P, int64_t R, int64_t Q, int64_t r, T m, T th,
                              int64_t count, T add) {
    double s = 0;
    for (int64_t p = 0; p < P && count > 0; p++) {
        const int64_t off = (p * R + r) * Q;
        for (int64_t i = 0; i < Q && count > 0; i++) {
            T v = x[off + i] - m;
            if (ABS(v) == th) {
                s += SIGN(v);
                if (dx) dx[off + i] += add * SIGN(v);
                count--;
            }
        }
    }
    return s;
}

/* The coefficients of row r's input gradient (see ns_backward_)
 *   dx = g / d + c0 + cv v + (cs + [|v| >= thg] tc) sign(v),  dl = dL/dd,
 * from the row's sums sg = sum g, sgv = sum g v, ss = sum sign(v) and, for top-k, sge, cge
 * (the sum of sign(v) and the count where |v| >= th). A tied k-th place (cge > k) is
 * resolved by reading the row again: fix = how many of the values equal to th, the earliest
 * first, take the top-k term. gmad_r: &gmad[r], or NULL. Shared by the row and the column
 * kernels (a column c is row c of the layout P = M, R = C, Q = 1). */
struct FN(coefs_) { T c0, dl, cv, cs, tc, thg; int64_t fix; };

static struct FN(coefs_) FN(grad_coefs_)(const T *x, int64_t P, int64_t R, int64_t Q, int64_t r, int stat,
                                         int64_t k, double cinf, T m, T d, T th, double sg, double sgv,
                                         double ss, double sge, int64_t cge, const T *gmad_r) {
    const int64_t n = P * Q;
    /* (divisions by what is known before the row's sums only, so that they run while the
     * sums are added: a division after them was the longest step of a short row's chain) */
    const double inv_n = 1.0 / (double)n;
    const T inv = (T)1 / d, inv_dd = (T)1 / (d * d), inv_nt = (T)inv_n;
    struct FN(coefs_) o;
    o.c0 = (T)(-sg * inv_n) * inv;
    o.dl = (T)(-sgv) * inv_dd;
    o.cv = 0; o.cs = 0; o.tc = 0;
    if (stat == STAT_L2) o.cv = o.dl * (inv_nt * inv);
    if (stat == STAT_L1) o.cs = o.dl * ((T)C_L1 * inv_nt);
    if (gmad_r) o.cs += *gmad_r * inv_nt;
    if (stat == STAT_L1 || gmad_r) o.c0 -= o.cs * (T)(ss * inv_n);
    o.thg = th;   /* the top-k term goes to |v| >= thg ... */
    o.fix = 0;    /* ... and to the first `fix` values with |v| == th */
    if (stat == STAT_TOPK) {
        double ts = sge;
        if (cge > k) {   /* the k-th place is tied: those above it, then the earliest ties */
            int64_t cgt = 0;
            ts = 0;
            for (int64_t p = 0; p < P; p++) {
                const T *xs = x + (p * R + r) * Q;
                for (int64_t i = 0; i < Q; i++) {
                    T v = xs[i] - m;
                    if (ABS(v) > th) { ts += SIGN(v); cgt++; }
                }
            }
            o.fix = k - cgt;
            ts += FN(first_ties_)(x, NULL, P, R, Q, r, m, th, o.fix, 0);
            o.thg = NEXTAFTER(th, (T)INFINITY);   /* |v| >= thg  <=>  |v| > th */
        }
        o.tc = o.dl * (T)(cinf / (double)k);
        o.c0 -= o.tc * (T)ts * inv_nt;
    }
    return o;
}

/* Gradients. With g = dy * gamma[c], S_g = sum(g), S_gv = sum(g * v), dL/dd = -S_gv / d^2:
 *   dx = g / d - S_g / (n d) + dL/dd * (dd/dv - mean(dd/dv))
 *        + gmad / n * (sign(v) - mean(sign(v)))
 * dd/dv: L2 v / (n d); L1 C_L1 sign(v) / n; TOPK cinf sign(v) / k at the top-k positions:
 * the values with |v| >= thr[r] (the k-th largest, from the forward) when they are k, else
 * (the k-th place is tied) those above it and the earliest of those equal to it.
 * dgamma[c] = sum(dy * v) / d and dbeta[c] = sum(dy) over the values of channel c (summed in
 * double, written in T);
 * dldd[r] = dL/dd (for the gradient of delta). mu NULL: each row's mean is computed again
 * by row_mean_, as every forward path computed it (bit for bit: the top-k positions are
 * found by comparing |x - mean| with thr), so that a short row keeps no more for backward
 * than the native layer (its input, d and thr, against the input, mean and 1 / sd). */
int FN(ns_backward_)(const T *x, const T *dy, int64_t P, int64_t R, int64_t Q, int stat, int64_t k,
                     double cinf, const T *mu, const T *dd_, const T *gamma, int64_t S, int64_t Cq,
                     const T *thr, const T *gmad, T *dx, T *dgamma, T *dbeta, T *dldd,
                     int nthreads) {
    const int64_t n = P * Q;
    const int topk = stat == STAT_TOPK;
    int want_cols = dgamma != NULL || dbeta != NULL;
    double *parts = NULL;
    int np = nthreads > 0 ? nthreads : 1;
    if (P > 1) S = Q;
    if (want_cols) {
        parts = (double *)calloc((size_t)np * 2 * (size_t)Cq, sizeof(double));
        if (!parts) return 1;
    }
    int used = 1, failed = 0;
#pragma omp parallel num_threads(np)
    {
        int t = thread_id(), nt = thread_count();
        if (t == 0) used = nt;
        double *pg = parts ? parts + (size_t)t * 2 * (size_t)Cq : NULL;
        double *pb = parts ? pg + Cq : NULL;
        /* layer rows: the columns' sums in T over NS_FLUSH rows (fg, fb), then into pg, pb */
        T *fg = NULL, *fb = NULL;
        int64_t unflushed = 0;
        if (pg && P == 1 && S == 1) {
            fg = (T *)ns_thread_scratch(2 * (size_t)Cq * sizeof(T), 1, &failed);
            if (fg) fb = fg + Cq;
        }
        int64_t r0 = R * t / nt, r1 = R * (t + 1) / nt;
        if (pg && P == 1 && S == 1 && !fg) r1 = r0;
        int need_sign = stat == STAT_L1 || gmad != NULL;
        int use_sign = need_sign || topk;
        T means[NS_MEANS_AHEAD];   /* (mu NULL) the means of rows means_from, ... */
        int64_t means_from = r0 - NS_MEANS_AHEAD;
        for (int64_t r = r0; r < r1; r++) {
            if (!mu && r - means_from >= NS_MEANS_AHEAD) {   /* the next rows' means, one after another */
                means_from = r;
#if NS_V8_IN_REGISTER
                if (P == 1 && NS_PORTABLE_SUMS && NS_MEANS_AHEAD == NS_LANES)
                    FN(lanes_means_)(x + r * n, n, r1 - r < NS_MEANS_AHEAD ? r1 - r : NS_MEANS_AHEAD, means);
                else
#endif
                    for (int64_t q = r; q < r1 && q - r < NS_MEANS_AHEAD; q++) means[q - r] = FN(row_mean_)(x, P, R, Q, q);
            }
            if (!mu && P == 1 && S == 1 && r + 2 * NS_MEANS_AHEAD < r1) {
                /* (mu NULL: short top-k rows) the lines of x two blocks of means ahead, of dy
                 * one: the means' pass over a block was the first to touch its rows and
                 * waited on memory; this request for them spread over the rows before cut
                 * the backward on rows of 64 values to 0.89-0.94x (with the means kept,
                 * where the sums pass streams x itself, the same requests were 1.08x slower) */
                const char *xa = (const char *)(x + (r + 2 * NS_MEANS_AHEAD) * n);
                const char *da = (const char *)(dy + (r + NS_MEANS_AHEAD) * n);
                for (int64_t o = 0; o < n * (int64_t)sizeof(T); o += 64) { NS_PREFETCH(xa + o); NS_PREFETCH(da + o); }
            }
            T m = mu ? mu[r] : means[r - means_from], d = dd_[r], inv = (T)1 / d;
            T th = topk ? thr[r] : (T)INFINITY;
            double sg = 0, sgv = 0, ss = 0, sge = 0;   /* sge: sum sign(v) where |v| >= th, cge of them */
            int64_t cge = 0;
            if (P == 1 && S == 1) {   /* one pass: the row's sums and (pg, pb) the columns' */
                const T *xr = x + r * n, *dyr = dy + r * n;
                struct FN(sums_) rs;
                if (topk)   /* (constant flags: each call is its own loop, with no branch inside) */
                    rs = fg ? FN(row_sums_)(xr, dyr, gamma, n, m, inv, th, 1, 1, fg, fb)
                            : FN(row_sums_)(xr, dyr, gamma, n, m, inv, th, 1, 0, NULL, NULL);
                else
                    rs = fg ? FN(row_sums_)(xr, dyr, gamma, n, m, inv, th, 0, 1, fg, fb)
                            : FN(row_sums_)(xr, dyr, gamma, n, m, inv, th, 0, 0, NULL, NULL);
                sg = rs.g; sgv = rs.gv; ss = rs.sign; sge = rs.sign_ge; cge = (int64_t)rs.count_ge;
                if (fg && (++unflushed == NS_FLUSH || r == r1 - 1)) {
                    for (int64_t i = 0; i < n; i++) {
                        pg[i] += (double)fg[i]; pb[i] += (double)fb[i];
                        fg[i] = 0; fb[i] = 0;
                    }
                    unflushed = 0;
                }
            } else {
                for (int64_t p = 0; p < P; p++) {
                    const T *xs = x + (p * R + r) * Q, *dys = dy + (p * R + r) * Q;
                    for (int64_t j = 0; j < Q; j += S) {
                        int64_t c = FN(channel_)(P, r, n, j, S, Cq);
                        struct FN(sums_) sr = topk
                            ? FN(row_sums_)(xs + j, dys + j, NULL, S, m, inv, th, 1, 0, NULL, NULL)
                            : FN(row_sums_)(xs + j, dys + j, NULL, S, m, inv, th, 0, 0, NULL, NULL);
                        T rdy = sr.g, rdyv = sr.gv, rs = sr.sign;
                        sge += sr.sign_ge; cge += (int64_t)sr.count_ge;
                        T gc = gamma ? gamma[c] : (T)1;
                        sg += (double)(gc * rdy); sgv += (double)(gc * rdyv); ss += rs;
                        if (pg) { pg[c] += (double)(rdyv * inv); pb[c] += (double)rdy; }
                    }
                }
            }
            const struct FN(coefs_) co = FN(grad_coefs_)(x, P, R, Q, r, stat, k, cinf, m, d, th, sg, sgv, ss, sge, cge,
                                                         gmad ? gmad + r : NULL);
            const T c0 = co.c0, dl = co.dl, cv = co.cv, cs = co.cs, tc = co.tc, thg = co.thg;
            const int64_t fix = co.fix;
            if (dldd) dldd[r] = dl;
            if (P == 1 && S == 1) {
                const T *xr = x + r * n, *dyr = dy + r * n;
                T *dxr = dx + r * n;
#pragma omp simd
                for (int64_t i = 0; i < n; i++) {
                    T v = xr[i] - m;
                    T g = gamma ? dyr[i] * gamma[i] : dyr[i];
                    T sc = use_sign ? cs + (ABS(v) >= thg ? tc : (T)0) : (T)0;
                    dxr[i] = g * inv + c0 + cv * v + sc * SIGN(v);
                }
            } else {
                for (int64_t p = 0; p < P; p++) {
                    const T *xs = x + (p * R + r) * Q, *dys = dy + (p * R + r) * Q;
                    T *dxs = dx + (p * R + r) * Q;
                    for (int64_t j = 0; j < Q; j += S) {
                        int64_t c = FN(channel_)(P, r, n, j, S, Cq);
                        T gi = gamma ? gamma[c] * inv : inv;
#pragma omp simd
                        for (int64_t i = j; i < j + S; i++) {
                            T v = xs[i] - m;
                            T sc = use_sign ? cs + (ABS(v) >= thg ? tc : (T)0) : (T)0;
                            dxs[i] = dys[i] * gi + c0 + cv * v + sc * SIGN(v);
                        }
                    }
                }
            }
            if (fix > 0) FN(first_ties_)(x, dx, P, R, Q, r, m, th, fix, tc);   /* the tied k-th place */
        }
        free(fg);
    }
    if (parts) {   /* the threads' sums in thread order, in double, then in T */
        for (int64_t c = 0; c < Cq; c++) {
            double sg = 0, sb = 0;
            for (int t = 0; t < used; t++) {
                const double *pg = parts + (size_t)t * 2 * (size_t)Cq;
                sg += pg[c];
                sb += pg[Cq + c];
            }
            if (dgamma) dgamma[c] = (T)sg;
            if (dbeta) dbeta[c] = (T)sb;
        }
        free(parts);
    }
    return failed;
}

#undef FN
#undef CAT
#undef CAT_
