/* Batch-area standardization of a channels-last array, for one element type (included
 * like rows_impl.h, with T, SUF, ABS, NEXTAFTER defined).
 *
 * x[i * C + c], i < M, c < C: column c holds channel c's M values (M = N * H * W positions
 * in (n, h, w) order), the values of row c of rows.c's (N, C, H * W) layout in the same
 * order. The formulas are rows.c's for P > 1 (gamma[c], beta[c] per channel); the kernels
 * read the columns in place, so a channels-last map needs no transposed copy of its input,
 * output, gradient or input gradient (four copies of the whole tensor cost 3-6x
 * nn.BatchNorm2d's time on it).
 *
 * A column sum is added in T over blocks of NS_COL_BLOCK positions (every loop runs along
 * the C contiguous channels: one vector lane per channel), then the blocks' sums in block
 * order in double, so a result does not depend on the thread count. The forward reads
 * the input three times (the mean; |x - m| or (x - m)^2 and the top-k candidates; the
 * output), the backward twice.
 */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUF)
/* the end of block b of NS_COL_BLOCK positions */
#define BLOCK_END(b, M) ((b) * NS_COL_BLOCK + NS_COL_BLOCK < (M) ? (b) * NS_COL_BLOCK + NS_COL_BLOCK : (M))
/* sign(v) in T (vector loops) */
#define FSIGN(v) ((T)((v) > 0) - (T)((v) < 0))

/* Top-k candidates: the mean's pass also keeps each block's largest and smallest value of
 * every column (bext[b 2C + c], bext[b 2C + C + c]), so that, once m is known, each block's
 * largest |x - m| is known, and the k-th largest of those (tau, taken where there are at
 * least k blocks) is at most the column's k-th largest |x - m|: only values with
 * |x - m| >= tau can be among the k largest, usually about k to 2 k of them. The second
 * pass (the one that adds |x - m| for the L1 statistic) writes those into a list per
 * column and thread (`cap` values; a full list is cut to its k largest by a quickselect,
 * its k-th largest becoming the bar a later value must pass, so that even a column of
 * equal values keeps at most `cap`). A thread's list holds every value of its positions
 * that is among its own k largest, so the threads' lists together hold the column's k
 * largest values (as a multiset). */
struct FN(cand_) {
    T *buf;          /* C cap values: column c's list at buf + c cap */
    T *bar;          /* C: a value enters column c's list when |x - m| > bar[c] */
    int64_t *count;  /* C */
    int64_t cap, k;
};

static int64_t FN(cand_cap_)(int64_t k) { return 2 * k + 32; }

static size_t FN(cand_bytes_)(int64_t C, int64_t k) {   /* one thread's lists (a multiple of 16) */
    return ((size_t)C * ((size_t)(FN(cand_cap_)(k) + 1) * sizeof(T) + sizeof(int64_t)) + 15) / 16 * 16;
}

static struct FN(cand_) FN(cand_at_)(void *mem, int64_t C, int64_t k) {
    struct FN(cand_) e;
    e.cap = FN(cand_cap_)(k);
    e.k = k;
    e.count = (int64_t *)mem;
    e.buf = (T *)(e.count + C);
    e.bar = e.buf + C * e.cap;
    return e;
}

static inline void FN(cand_push_)(struct FN(cand_) *e, int64_t c, T v) {
    T *L = e->buf + c * e->cap;
    L[e->count[c]++] = v;
    if (e->count[c] == e->cap) {   /* cut to the k largest */
        FN(select_desc_)(L, e->cap, e->k - 1);
        e->count[c] = e->k;
        e->bar[c] = L[e->k - 1];
    }
}

/* Each column's starting bar (tau, lowered by one step: a value enters when |x - m| >= tau;
 * -inf: every value, where there are fewer than k blocks or m is not finite) from the
 * blocks' extremes bext. scratch: nb values. */
static void FN(cand_bars_)(const T *bext, int64_t nb, int64_t C, int64_t k, const T *m, T *bar, T *scratch) {
    for (int64_t c = 0; c < C; c++) {
        bar[c] = (T)-INFINITY;
        if (nb < k || !isfinite(m[c])) continue;
        for (int64_t b = 0; b < nb; b++) {
            T hi = bext[b * 2 * C + c] - m[c], lo = m[c] - bext[b * 2 * C + C + c];
            scratch[b] = hi > lo ? hi : lo;
        }
        FN(select_desc_)(scratch, nb, k - 1);
        bar[c] = NEXTAFTER(scratch[k - 1], (T)-INFINITY);
    }
}

/* Column c's sum of its k largest |x - m| and the k-th largest (*thr), from the threads'
 * lists; the k largest are sorted and added in order, so the sum does not depend on the
 * thread count. cand: nt cap values of scratch. */
static T FN(cand_topk_)(int64_t C, int64_t k, int64_t c, T m, void *lists, size_t bytes, int nt, T *cand,
                        T *thr) {
    int64_t n = 0;
    if (!isfinite(m)) { *thr = (T)NAN; return (T)NAN; }   /* (a NaN or inf in the column) */
    for (int t = 0; t < nt; t++) {
        struct FN(cand_) e = FN(cand_at_)((char *)lists + (size_t)t * bytes, C, k);
        for (int64_t j = 0; j < e.count[c]; j++) cand[n++] = e.buf[c * e.cap + j];
    }
    FN(select_desc_)(cand, n, k - 1);
    FN(sort_desc_)(cand, k);
    T s = 0;
    for (int64_t j = 0; j < k; j++) s += cand[j];
    *thr = cand[k - 1];
    return s;
}

/* Sums over the positions of block b of every column (mode a constant at every call):
 * out[c] = sum x (mode 0), sum |x - m[c]| (1), sum (x - m[c])^2 (2); with mode 3 both of
 * the last two, into out[c] and out[C + c]. With bext (mode 0) the block's largest and
 * smallest value of every column go to bext (2 C values); with lists (mode 1) the
 * top-k candidates go into them. acc: 3 C values of scratch. The loops run along the row
 * of C channels, reading the block once (measured: keeping 16 channels' sums in registers
 * over the block's positions instead read it C / 16 times, 1.3-1.5x slower). */
static inline __attribute__((always_inline)) void FN(col_block_sums_)(
        const T *x, int64_t M, int64_t C, int64_t b, const T *m, const int mode, T *acc, double *out,
        T *bext, struct FN(cand_) *lists) {
    const int64_t i0 = b * NS_COL_BLOCK, i1 = BLOCK_END(b, M);
    T *a2 = acc + C, *a3 = acc + 2 * C;
    for (int64_t c = 0; c < C; c++) { acc[c] = 0; a2[c] = mode == 3 ? (T)0 : (T)-INFINITY; a3[c] = (T)INFINITY; }
    for (int64_t i = i0; i < i1; i++) {
        const T *xi = x + i * C;
        if (mode == 0 && bext) {
#pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                acc[c] += xi[c];
                a2[c] = xi[c] > a2[c] ? xi[c] : a2[c];
                a3[c] = xi[c] < a3[c] ? xi[c] : a3[c];
            }
        } else if (mode == 0) {
#pragma omp simd
            for (int64_t c = 0; c < C; c++) acc[c] += xi[c];
        } else if (mode == 1 && lists) {   /* (each chunk of channels checked in the same loop) */
            const T *bar = lists->bar;
            int64_t c0 = 0;
            for (; c0 + NS_LANES <= C; c0 += NS_LANES) {
                T mx = 0;
#pragma omp simd reduction(max:mx)
                for (int64_t c = c0; c < c0 + NS_LANES; c++) {
                    T v = ABS(xi[c] - m[c]);
                    acc[c] += v;
                    T d = v - bar[c];
                    mx = d > mx ? d : mx;
                }
                if (mx > 0)
                    for (int64_t c = c0; c < c0 + NS_LANES; c++) {
                        T v = ABS(xi[c] - m[c]);
                        if (v > bar[c]) FN(cand_push_)(lists, c, v);
                    }
            }
            for (int64_t c = c0; c < C; c++) {
                T v = ABS(xi[c] - m[c]);
                acc[c] += v;
                if (v > bar[c]) FN(cand_push_)(lists, c, v);
            }
        } else if (mode == 1) {
#pragma omp simd
            for (int64_t c = 0; c < C; c++) acc[c] += ABS(xi[c] - m[c]);
        } else if (mode == 2) {
#pragma omp simd
            for (int64_t c = 0; c < C; c++) acc[c] += (xi[c] - m[c]) * (xi[c] - m[c]);
        } else {
#pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                T v = xi[c] - m[c];
                acc[c] += ABS(v);
                a2[c] += v * v;
            }
        }
    }
    for (int64_t c = 0; c < C; c++) out[c] = (double)acc[c];
    if (mode == 3)
        for (int64_t c = 0; c < C; c++) out[C + c] = (double)a2[c];
    if (mode == 0 && bext)
        for (int64_t c = 0; c < C; c++) { bext[c] = a2[c]; bext[C + c] = a3[c]; }
}

/* The column sums of `mode` over all blocks, added in block order: tot[c] (and, mode 3,
 * tot[C + c]). part: nb * W * C doubles of scratch (W = 2 for mode 3, else 1). Thread t
 * takes blocks [nb t / nt, nb (t + 1) / nt). bext (mode 0): nb 2 C values for the blocks'
 * extremes; lists (mode 1): nthreads cand_bytes_ for the top-k candidates (empty, with
 * their starting bars). Returns nonzero when a thread's scratch could not be allocated. */
static int FN(col_sums_)(const T *x, int64_t M, int64_t C, const T *m, int mode, double *part, double *tot,
                         int64_t k, T *bext, void *lists, int nthreads) {
    const int64_t nb = (M + NS_COL_BLOCK - 1) / NS_COL_BLOCK, w = mode == 3 ? 2 : 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        T *acc = (T *)ns_thread_scratch(3 * (size_t)C * sizeof(T), 0, &failed);
        const int t = thread_id(), nt = thread_count();
        const int64_t b0 = nb * t / nt, b1 = acc ? nb * (t + 1) / nt : b0;
        struct FN(cand_) e, *te = NULL;
        if (lists) {
            e = FN(cand_at_)((char *)lists + (size_t)t * FN(cand_bytes_)(C, k), C, k);
            te = &e;
        }
        for (int64_t b = b0; b < b1; b++) {
            double *o = part + b * w * C;
            if (mode == 0) FN(col_block_sums_)(x, M, C, b, m, 0, acc, o, bext ? bext + b * 2 * C : NULL, NULL);
            else if (mode == 1) FN(col_block_sums_)(x, M, C, b, m, 1, acc, o, NULL, te);
            else if (mode == 2) FN(col_block_sums_)(x, M, C, b, m, 2, acc, o, NULL, NULL);
            else FN(col_block_sums_)(x, M, C, b, m, 3, acc, o, NULL, NULL);
        }
        free(acc);
    }
    if (failed) return 1;
    ns_add_blocks(part, nb, w * C, tot);
    return 0;
}

int FN(ns_cols_forward_)(const T *x, int64_t M, int64_t C, int stat, int64_t k, double cinf, double eps,
                         double delta, const T *gamma, const T *beta, int need_mad, T *y, T *mu, T *dout,
                         T *mad, T *bstat, T *thr, int nthreads) {
    const int64_t nb = (M + NS_COL_BLOCK - 1) / NS_COL_BLOCK;
    /* (top-k: its candidates come out of the |x - m| pass) */
    const int want_abs = stat == STAT_L1 || stat == STAT_TOPK || need_mad, want_sq = stat == STAT_L2;
    const int topk = stat == STAT_TOPK, nt = nthreads > 0 ? nthreads : 1;
    double *part = (double *)malloc((size_t)nb * 2 * (size_t)C * sizeof(double));
    double *tot = (double *)malloc(2 * (size_t)C * sizeof(double));
    T *coef = (T *)malloc(3 * (size_t)C * sizeof(T));   /* scale, shift, sum of the k largest */
    /* top-k: the blocks' extremes, the threads' candidate lists, a column's candidates (or
     * its blocks' largest |x - m|), the starting bars */
    const int64_t ncand = nt * FN(cand_cap_)(k) > nb ? nt * FN(cand_cap_)(k) : nb;
    T *bext = topk ? (T *)malloc((size_t)nb * 2 * (size_t)C * sizeof(T)) : NULL;
    void *lists = topk ? malloc((size_t)nt * FN(cand_bytes_)(C, k)) : NULL;
    T *cand = topk ? (T *)malloc((size_t)(ncand + C) * sizeof(T)) : NULL, *bars = cand ? cand + ncand : NULL;
    int failed = !part || !tot || !coef || (topk && (!bext || !lists || !cand));
    if (!failed) failed = FN(col_sums_)(x, M, C, NULL, 0, part, tot, k, bext, NULL, nt);
    if (!failed) {
        for (int64_t c = 0; c < C; c++) mu[c] = (T)(tot[c] / (double)M);
        if (topk) {
            FN(cand_bars_)(bext, nb, C, k, mu, bars, cand);
            for (int t = 0; t < nt; t++) {   /* every thread's lists empty (also those of threads that do not run) */
                struct FN(cand_) e = FN(cand_at_)((char *)lists + (size_t)t * FN(cand_bytes_)(C, k), C, k);
                for (int64_t c = 0; c < C; c++) { e.count[c] = 0; e.bar[c] = bars[c]; }
            }
        }
        if (want_abs || want_sq)
            failed = FN(col_sums_)(x, M, C, mu, want_abs && want_sq ? 3 : want_abs ? 1 : 2, part, tot, k, NULL,
                                   lists, nt);
    }
    T *sk = coef + 2 * C;
    if (!failed && topk)
        for (int64_t c = 0; c < C; c++)
            sk[c] = FN(cand_topk_)(C, k, c, mu[c], lists, FN(cand_bytes_)(C, k), nt, cand, thr + c);
    if (!failed) {
        T *scale = coef, *shift = coef + C;
        for (int64_t c = 0; c < C; c++) {
            const double n = (double)M, sa = want_abs ? tot[c] : 0;
            T dd, bs;
            if (stat == STAT_L2) {
                bs = (T)(tot[want_abs ? C + c : c] / n);
                dd = (T)sqrt((double)bs + delta);
            } else if (stat == STAT_L1) {
                bs = (T)(sa / n);
                dd = (T)(C_L1 * (double)bs + eps);
            } else {
                T s = sk[c] / (T)k;   /* (NaN where m is not finite) */
                bs = (T)(cinf * (double)s);
                dd = (T)(cinf * (double)s + eps);
            }
            dout[c] = dd; bstat[c] = bs;
            if (mad) mad[c] = (T)(sa / n);
            T inv = (T)1 / dd;
            scale[c] = gamma ? inv * gamma[c] : inv;
            shift[c] = beta ? beta[c] : (T)0;
        }
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t b = 0; b < nb; b++) {
            const int64_t i1 = BLOCK_END(b, M);
            for (int64_t i = b * NS_COL_BLOCK; i < i1; i++) {
                const T *xi = x + i * C;
                T *yi = y + i * C;
#pragma omp simd
                for (int64_t c = 0; c < C; c++) yi[c] = (xi[c] - mu[c]) * scale[c] + shift[c];
            }
        }
    }
    free(part); free(tot); free(coef); free(bext); free(lists); free(cand);
    return failed;
}

/* The backward's sums over block b of every column, with v = x - m[c]: sum dy, sum dy v,
 * sum sign(v), and for top-k the sum of sign(v) where |v| >= th[c] and how many they are
 * (out[j * C + c], j = 0..4). acc: 5 C values of scratch. */
static inline __attribute__((always_inline)) void FN(col_block_grads_)(
        const T *x, const T *dy, int64_t M, int64_t C, int64_t b, const T *m, const T *th, const int topk,
        T *acc, double *out) {
    const int64_t i0 = b * NS_COL_BLOCK, i1 = BLOCK_END(b, M);
    T *a1 = acc, *a2 = acc + C, *a3 = acc + 2 * C, *b1 = acc + 3 * C, *c1 = acc + 4 * C;
    for (int64_t j = 0; j < 5 * C; j++) acc[j] = 0;
    for (int64_t i = i0; i < i1; i++) {
        const T *xi = x + i * C, *dyi = dy + i * C;
        if (topk) {
#pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                /* (this loop vectorizes with selects, the others with FSIGN, under gcc 12) */
                T v = xi[c] - m[c], sv = v > 0 ? (T)1 : v < 0 ? (T)-1 : (T)0, ge = ABS(v) >= th[c] ? (T)1 : (T)0;
                a1[c] += dyi[c]; a2[c] += dyi[c] * v; a3[c] += sv;
                b1[c] += ge * sv; c1[c] += ge;
            }
        } else {
#pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                T v = xi[c] - m[c];
                a1[c] += dyi[c]; a2[c] += dyi[c] * v; a3[c] += FSIGN(v);
            }
        }
    }
    for (int64_t j = 0; j < (topk ? 5 : 3) * C; j++) out[j] = (double)acc[j];
}

/* Gradients (rows.c's ns_backward for P > 1, one column per row): with g = dy * gamma[c],
 *   dx = g / d - S_g / (n d) + dL/dd * (dd/dv - mean(dd/dv)) + gmad / n * (sign(v) - mean(sign(v)))
 * mu: the forward's means (always given here). */
int FN(ns_cols_backward_)(const T *x, const T *dy, int64_t M, int64_t C, int stat, int64_t k, double cinf,
                          const T *mu, const T *dd_, const T *gamma, const T *thr, const T *gmad, T *dx,
                          T *dgamma, T *dbeta, T *dldd, int nthreads) {
    const int topk = stat == STAT_TOPK, w = topk ? 5 : 3;
    const int64_t nb = (M + NS_COL_BLOCK - 1) / NS_COL_BLOCK;
    double *part = (double *)malloc((size_t)nb * w * (size_t)C * sizeof(double));
    double *tot = (double *)calloc(5 * (size_t)C, sizeof(double));   /* (the top-k sums 0 for the others) */
    T *coef = (T *)malloc(7 * (size_t)C * sizeof(T));   /* gi, c0, cv, cs, tc, thg, th */
    int64_t *fix = (int64_t *)calloc((size_t)C, sizeof(int64_t));
    int failed = !part || !tot || !coef || !fix;
    if (!failed) {
        T *th = coef + 6 * C;
        for (int64_t c = 0; c < C; c++) th[c] = topk ? thr[c] : (T)INFINITY;
#pragma omp parallel num_threads(nthreads)
        {
            T *acc = (T *)ns_thread_scratch(5 * (size_t)C * sizeof(T), 0, &failed);
            if (acc) {
#pragma omp for schedule(static)
                for (int64_t b = 0; b < nb; b++) {
                    if (topk) FN(col_block_grads_)(x, dy, M, C, b, mu, th, 1, acc, part + b * w * C);
                    else FN(col_block_grads_)(x, dy, M, C, b, mu, th, 0, acc, part + b * w * C);
                }
            }
            free(acc);
        }
    }
    if (!failed) {
        ns_add_blocks(part, nb, w * C, tot);
        T *gi = coef, *c0v = coef + C, *cvv = coef + 2 * C, *csv = coef + 3 * C, *tcv = coef + 4 * C,
          *thg = coef + 5 * C, *th = coef + 6 * C;
        for (int64_t c = 0; c < C; c++) {   /* (column c: row c of the layout P = M, R = C, Q = 1) */
            const T d = dd_[c], inv = (T)1 / d, gc = gamma ? gamma[c] : (T)1;
            const double sdy = tot[c], sdyv = tot[C + c];
            const struct FN(coefs_) co = FN(grad_coefs_)(x, M, C, 1, c, stat, k, cinf, mu[c], d, th[c],
                                                         (double)gc * sdy, (double)gc * sdyv, tot[2 * C + c],
                                                         tot[3 * C + c], (int64_t)tot[4 * C + c],
                                                         gmad ? gmad + c : NULL);
            if (dldd) dldd[c] = co.dl;
            if (dgamma) dgamma[c] = (T)(sdyv * (double)inv);
            if (dbeta) dbeta[c] = (T)sdy;
            gi[c] = gc * inv; c0v[c] = co.c0; cvv[c] = co.cv; csv[c] = co.cs; tcv[c] = co.tc;
            thg[c] = co.thg; fix[c] = co.fix;
        }
        const int use_sign = stat == STAT_L1 || gmad != NULL || topk;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t b = 0; b < nb; b++) {
            const int64_t i1 = BLOCK_END(b, M);
            for (int64_t i = b * NS_COL_BLOCK; i < i1; i++) {
                const T *xi = x + i * C, *dyi = dy + i * C;
                T *dxi = dx + i * C;
                if (use_sign) {
#pragma omp simd
                    for (int64_t c = 0; c < C; c++) {
                        T v = xi[c] - mu[c];
                        T sc = csv[c] + (ABS(v) >= thg[c] ? tcv[c] : (T)0);
                        dxi[c] = dyi[c] * gi[c] + c0v[c] + cvv[c] * v + sc * FSIGN(v);
                    }
                } else {
#pragma omp simd
                    for (int64_t c = 0; c < C; c++)
                        dxi[c] = dyi[c] * gi[c] + c0v[c] + cvv[c] * (xi[c] - mu[c]);
                }
            }
        }
        for (int64_t c = 0; c < C; c++)   /* the tied k-th place (a rare path) */
            if (fix[c] > 0) FN(first_ties_)(x, dx, M, C, 1, c, mu[c], th[c], fix[c], tcv[c]);
    }
    free(part); free(tot); free(coef); free(fix);
    return failed;
}

#undef FSIGN
#undef BLOCK_END
#undef FN
#undef CAT
#undef CAT_
