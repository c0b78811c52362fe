/* Divisive normalization along rows, forward and backward (included by rows.c).
 *
 * DivisiveNorm1d (and DN on (N, 1, H, W) with windows along W only) normalizes each row
 * x of n values by local windows of radius a (mean) and b (variance), cut at the row's
 * ends and averaged over the values they cover:
 *
 *   m_j = box_a(x)_j / cnt_a(j),   v = x - m,   q_j = box_b(v^2)_j / cnt_b(j),
 *   r = (q + s)^(-1/2)   (s = sigma^2 + eps),   y = v r,
 *
 * with box_w(t)_j = sum of t_i over |i - j| <= w, 0 <= i < n, and cnt_w(j) = box_w(1)_j.
 * The backward, for dy and g = dL/d(sum |v|) (the C = 1 case of normswap's
 * DivisiveNormFn; a centred box sum is its own adjoint):
 *
 *   dq = -r^3 / 2 dy v,   c = 2 box_b(dq / cnt_b),   dv = dy r + c v + g sign(v),
 *   dx = dv - box_a(dv / cnt_a),   and sum(dq) for dL/dsigma = 2 sigma sum(dq).
 *
 * The forward keeps nothing but x: the backward computes m, v and r again, so the layer
 * saves what nn.LayerNorm saves.
 *
 * Rows side by side. The kernel works on DN_VEC_BYTES / sizeof(T) rows at once (8 float
 * rows with AVX2, 16 with AVX-512): a group's rows are transposed into scratch vectors
 * whose lanes are the rows, so value j of every row is one vector, each step of a sum is
 * one vector addition, and the window positions' counts are one broadcast. The last group
 * is padded with zero rows, whose lanes are dropped.
 *
 * Box sums without cancellation (van Herk / Gil-Werman). The padded positions
 * 0 .. n + 2 w - 1 (value t_{p - w}, zero outside the row) are cut into blocks of
 * W = 2 w + 1; the window of output j is the padded positions j .. j + 2 w. It is a whole
 * block when j is a block's start, else the suffix of j's block from j (S_j) and the
 * prefix of the next block up to j + 2 w (P_{j + 2 w}):
 *
 *   box_w(t)_j = S_j + P_{j + 2 w}   (S_j alone where W divides j),
 *
 * two scans in opposite directions and one addition per value whatever the width, and
 * every sum holds values of the window alone: a window far from a huge or non-finite
 * value does not see it, and the sums have the precision of the window's own sum (prefix
 * sums' differences would lose it to the row's total). So the rows are computed in their
 * own precision (float rows in float, as nn.LayerNorm's); the sums over rows (sum |v|,
 * sum dq) are added in double in row order after the parallel loop, so every result
 * depends on the inputs alone, not on the thread count.
 */

#ifndef DN_VEC_BYTES /* (-DDN_VEC_BYTES=64 runs AVX-512's layout of 16 float rows anywhere) */
#if defined(__AVX512F__)
#define DN_VEC_BYTES 64
#else
#define DN_VEC_BYTES 32
#endif
#endif
#if defined(__AVX__) && DN_VEC_BYTES < 32
#error "DN_VEC_BYTES: at least one AVX register (the transposes' tiles fill 32 bytes of each vector)"
#endif

/* 1 / cnt_w(j) (j < n, w < n) */
static double dn_inverse_count(int64_t n, int64_t w, int64_t j) {
    int64_t hi = j + w < n - 1 ? j + w : n - 1, lo = j - w > 0 ? j - w : 0;
    return 1.0 / (double)(hi - lo + 1);
}

/* A group's rows side by side, value j of each row in one vector (aligned as its elements:
 * the scratch comes from malloc) */
typedef float dn_v_f32 __attribute__((vector_size(DN_VEC_BYTES), aligned(4)));
typedef int32_t dn_vi_f32 __attribute__((vector_size(DN_VEC_BYTES), aligned(4)));
typedef double dn_v_f64 __attribute__((vector_size(DN_VEC_BYTES), aligned(8)));
typedef int64_t dn_vi_f64 __attribute__((vector_size(DN_VEC_BYTES), aligned(8)));
enum { DN_LANES_f32 = DN_VEC_BYTES / 4, DN_LANES_f64 = DN_VEC_BYTES / 8 };

/* 1 / sqrt(q) lane by lane in the lanes' precision, a register at a time */
#if defined(__AVX512F__)
#define DN_REG_f32 __m512
#define DN_REG_f64 __m512d
#define DN_RSQRT_REG_f32(h) _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_sqrt_ps(h))
#define DN_RSQRT_REG_f64(h) _mm512_div_pd(_mm512_set1_pd(1.0), _mm512_sqrt_pd(h))
#elif defined(__AVX__)
#define DN_REG_f32 __m256
#define DN_REG_f64 __m256d
#define DN_RSQRT_REG_f32(h) _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_sqrt_ps(h))
#define DN_RSQRT_REG_f64(h) _mm256_div_pd(_mm256_set1_pd(1.0), _mm256_sqrt_pd(h))
#else
#define DN_REG_f32 float
#define DN_REG_f64 double
#define DN_RSQRT_REG_f32(h) (1.0f / sqrtf(h))
#define DN_RSQRT_REG_f64(h) (1.0 / sqrt(h))
#endif
#define DN_RSQRT(SUF_)                                                                               \
static inline dn_v_##SUF_ dn_rsqrt_##SUF_(dn_v_##SUF_ q) {                                           \
    union { dn_v_##SUF_ v; DN_REG_##SUF_ reg[sizeof(dn_v_##SUF_) / sizeof(DN_REG_##SUF_)]; } u;      \
    u.v = q;                                                                                         \
    for (size_t k = 0; k < sizeof(u.reg) / sizeof(u.reg[0]); k++)                                    \
        u.reg[k] = DN_RSQRT_REG_##SUF_(u.reg[k]);                                                    \
    return u.v;                                                                                      \
}
DN_RSQRT(f32)
DN_RSQRT(f64)
#undef DN_RSQRT


/* The next group of rows is fetched into the cache while the current one is computed, one
 * array in each of the current group's box sums (DN_BOX_FETCHING): x in the first, the lines
 * of out (for writing) in the forward's second, dy in the backward's second and out in its
 * third. A group of up to DN_FETCH_AT_ONCE_MAX bytes requests its array at once as the pass
 * starts (dn_request); a longer one a vector's bytes per step of the pass, so that the
 * requests wait neither on each other nor on the pass. Without the requests for out the
 * scatter's stores waited on their lines. Measured on the AVX2 EPYC, one thread: against
 * fetching x, dy and out all during the first box sum, with out only by steps, rows of 64
 * floats (2 KiB groups, x, dy and out then requested together as the group was read)
 * 0.79-0.82x forward, 0.91x backward; rows of 128 (4 KiB) 0.91-0.94x / 0.81-0.82x (by steps
 * for those: 0.93x / 1.12x of at once); rows of 160-224 0.87-0.89x / 0.88-0.94x and rows of
 * 256-1024 0.91-0.92x / 0.88-0.94x (by steps). Then the short groups' arrays one per pass
 * instead of all three as the group was read: rows of 64 0.87-0.89x forward, 0.88-0.90x
 * backward (the requests had filled the load queue). */
typedef struct {
    const char *x, *dy;   /* the next group's rows (dy NULL in the forward) */
    char *out;
    int64_t bytes;        /* of each array: 0 for none (the last group) */
    int at_once;          /* bytes <= DN_FETCH_AT_ONCE_MAX */
} dn_next_t;
#define DN_FETCH_AT_ONCE_MAX 4096

/* bytes from c into the cache at once (write: for writing; a constant at every call) */
static inline __attribute__((always_inline)) void dn_request(const char *c, int64_t bytes, const int write) {
    if (write)
        for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 1, 3);
    else
        for (int64_t i = 0; i < bytes; i += 64) NS_PREFETCH(c + i);
}

/* DN_BOX_EACH(V_, t, n, w, p, q, bx, body): for q = n - 1 down to 0, body with bx =
 * box_w(t)_q (a V_). First the blocks' prefix sums P_q (q = W .. n + 2 w - 1) into
 * p[q - W] (n - 1 vectors), then the suffix sums block by block, backwards. Both scans add
 * even and odd steps into two accumulators (two chains of additions at once; 25-35% faster
 * with the rows in cache). Step q reads t at q - w and below alone, so body may write t[q]
 * (or an array t was read from). */
#define DN_BOX_EACH(V_, t, n, w, p, q, bx, ...)                                                      \
    do {                                                                                             \
        const int64_t W_ = 2 * (w) + 1, end_ = (n) + 2 * (w), stop_ = (n) + (w);                     \
        if (W_ > 1)                                                                                  \
            for (int64_t q0_ = W_; q0_ < end_; q0_ += W_) { /* t_{q - w} is 0 from stop_ */          \
                const int64_t q1_ = q0_ + W_ < end_ ? q0_ + W_ : end_;                               \
                const int64_t in_ = q1_ < stop_ ? q1_ : stop_;                                       \
                int64_t i_ = q0_;                                                                    \
                V_ acc_ = {0}, odd_ = {0};                                                           \
                for (; i_ + 1 < in_; i_ += 2) {                                                      \
                    (p)[i_ - W_] = (acc_ += (t)[i_ - (w)]) + odd_;                                   \
                    (p)[i_ + 1 - W_] = acc_ + (odd_ += (t)[i_ + 1 - (w)]);                           \
                }                                                                                    \
                acc_ += odd_;                                                                        \
                for (; i_ < in_; i_++) (p)[i_ - W_] = acc_ += (t)[i_ - (w)];                         \
                for (; i_ < q1_; i_++) (p)[i_ - W_] = acc_;                                          \
            }                                                                                        \
        for (int64_t q0_ = ((n) - 1) / W_ * W_; q0_ >= 0; q0_ -= W_) {                               \
            int64_t q = (q0_ + W_ < stop_ ? q0_ + W_ : stop_) - 1;                                   \
            V_ acc_ = {0}, odd_ = {0};                                                               \
            for (; q - 1 >= (n); q -= 2) {                                                           \
                acc_ += (t)[q - (w)];                                                                \
                odd_ += (t)[q - 1 - (w)];                                                            \
            }                                                                                        \
            for (; q - 1 > q0_ && q - 1 >= (w); q--) {                                               \
                acc_ += (t)[q - (w)];                                                                \
                if (q < (n)) {                                                                       \
                    const V_ bx = acc_ + odd_ + (p)[q - 1];                                          \
                    __VA_ARGS__                                                                      \
                }                                                                                    \
                q--;                                                                                 \
                odd_ += (t)[q - (w)];                                                                \
                const V_ bx = acc_ + odd_ + (p)[q - 1];                                              \
                __VA_ARGS__                                                                          \
            }                                                                                        \
            acc_ += odd_;                                                                            \
            for (; q >= q0_; q--) {                                                                  \
                if (q >= (w)) acc_ += (t)[q - (w)];                                                  \
                if (q < (n)) {                                                                       \
                    const V_ bx = q > q0_ ? acc_ + (p)[q - 1] : acc_;                                \
                    __VA_ARGS__                                                                      \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    } while (0)

/* DN_BOX_FETCHING(V_, t, n, w, p, q, bx, c, write, next, body): DN_BOX_EACH that also
 * requests the next group's array c (for writing if write): at once before the pass where
 * next->at_once, else the line of c at q vectors' bytes in step q while that is below
 * next->bytes. Separate copies of the pass with and without requests: a test in the loop
 * cost the short rows 4-10%. */
#define DN_BOX_FETCHING(V_, t, n, w, p, q, bx, c, write, next, ...)                                  \
    do {                                                                                             \
        const int64_t bytes_ = (next)->bytes;                                                        \
        if (bytes_ > 0 && !(next)->at_once)                                                          \
            DN_BOX_EACH(V_, t, n, w, p, q, bx, __VA_ARGS__                                           \
                        if ((q) * (int64_t)sizeof(V_) < bytes_)                                      \
                            __builtin_prefetch((c) + (q) * (int64_t)sizeof(V_), write, 3););        \
        else {                                                                                       \
            if (bytes_ > 0) dn_request((c), bytes_, write);                                          \
            DN_BOX_EACH(V_, t, n, w, p, q, bx, __VA_ARGS__);                                         \
        }                                                                                            \
    } while (0)

/* Per element type T_ (SUF_ f32 / f64; MAGNITUDE_ its bits but the sign, as an integer;
 * RSQRT_V_ 1 / sqrt(q) lane by lane in T_'s precision), on a group's rows:
 *
 * dn_centre: v = x - m over x, v^2 into t.
 * dn_forward_group: y = v r over x, returns the lanes' sums of |v|.
 * dn_backward_group: dx over dy, returns the lanes' sums of dq.
 *
 * p is scratch for DN_BOX_EACH; every box's consumer runs in its second pass. */
#define NS_DIVISIVE(T_, SUF_, MAGNITUDE_, RSQRT_V_)                                                  \
static void dn_centre_##SUF_(dn_v_##SUF_ *restrict x, int64_t n, int64_t a, const T_ *restrict ia,   \
                             dn_v_##SUF_ *restrict p, dn_v_##SUF_ *restrict t,                       \
                             const dn_next_t *next) {                                                \
    DN_BOX_FETCHING(dn_v_##SUF_, x, n, a, p, j, m, next->x, 0, next, {                               \
        x[j] -= m * ia[j];                                                                           \
        t[j] = x[j] * x[j];                                                                          \
    });                                                                                              \
}                                                                                                    \
                                                                                                     \
static dn_v_##SUF_ dn_forward_group_##SUF_(dn_v_##SUF_ *restrict x, int64_t n, int64_t a, int64_t b, \
                                           T_ s, const T_ *restrict ia, const T_ *restrict ib,       \
                                           dn_v_##SUF_ *restrict p, dn_v_##SUF_ *restrict t,         \
                                           const dn_next_t *next) {                                  \
    dn_centre_##SUF_(x, n, a, ia, p, t, next);                                                       \
    const dn_vi_##SUF_ magnitude = (dn_vi_##SUF_){0} + MAGNITUDE_; /* |v|: all bits but the sign */  \
    dn_v_##SUF_ abs_sum = {0};                                                                       \
    DN_BOX_FETCHING(dn_v_##SUF_, t, n, b, p, j, q, next->out, 1, next, {                             \
        abs_sum += (dn_v_##SUF_)((dn_vi_##SUF_)x[j] & magnitude);                                    \
        x[j] *= RSQRT_V_(q * ib[j] + s);                                                             \
    });                                                                                              \
    return abs_sum;                                                                                  \
}                                                                                                    \
                                                                                                     \
static dn_v_##SUF_ dn_backward_group_##SUF_(dn_v_##SUF_ *restrict x, dn_v_##SUF_ *restrict dy,       \
                                            int64_t n, int64_t a, int64_t b, T_ s, T_ g,             \
                                            const T_ *restrict ia, const T_ *restrict ib,            \
                                            dn_v_##SUF_ *restrict p, dn_v_##SUF_ *restrict t,        \
                                            const dn_next_t *next) {                                 \
    dn_centre_##SUF_(x, n, a, ia, p, t, next); /* x holds v from here */                             \
    dn_v_##SUF_ dq_sum = {0};                                                                        \
    /* t: v^2, then dq / cnt_b; dy: dy r (r is needed no further); the next group's dy */            \
    DN_BOX_FETCHING(dn_v_##SUF_, t, n, b, p, j, q, next->dy, 0, next, {                              \
        const dn_v_##SUF_ r = RSQRT_V_(q * ib[j] + s);                                               \
        const dn_v_##SUF_ dq = (T_)-0.5 * r * r * r * dy[j] * x[j];                                  \
        dq_sum += dq;                                                                                \
        t[j] = dq * ib[j];                                                                           \
        dy[j] *= r;                                                                                  \
    });                                                                                              \
    /* dy: dv; t: dv / cnt_a; the lines of the next group's out */                                   \
    DN_BOX_FETCHING(dn_v_##SUF_, t, n, b, p, j, c, next->out, 1, next, {                             \
        const dn_vi_##SUF_ sign = (x[j] < 0) - (x[j] > 0); /* comparisons give -1 / 0 */             \
        dy[j] = dy[j] + (T_)2 * c * x[j] + g * __builtin_convertvector(sign, dn_v_##SUF_);           \
        t[j] = dy[j] * ia[j];                                                                        \
    });                                                                                              \
    DN_BOX_EACH(dn_v_##SUF_, t, n, a, p, j, mdv, dy[j] -= mdv;);                                     \
    return dq_sum;                                                                                   \
}                                                                                                    \
                                                                                                     \
/* The rows row0 .. row0 + lanes - 1 of src (n values each) into the lanes of dst (zeros for         \
 * rows from `rows` on), and back (ns_transpose_: tiles in registers). */                            \
static void dn_gather_##SUF_(const T_ *restrict src, int64_t row0, int64_t rows, int64_t n,          \
                             dn_v_##SUF_ *restrict dst) {                                            \
    const int64_t L = DN_LANES_##SUF_, nb = rows - row0 < L ? rows - row0 : L;                       \
    T_ *d = (T_ *)dst;                                                                               \
    ns_transpose_##SUF_(src + row0 * n, n, d, L, nb, n);                                             \
    for (int64_t l = nb; l < L; l++)                                                                 \
        for (int64_t j = 0; j < n; j++) d[j * L + l] = 0;                                            \
}                                                                                                    \
static void dn_scatter_##SUF_(const dn_v_##SUF_ *restrict src, int64_t row0, int64_t rows,           \
                              int64_t n, T_ *restrict dst) {                                         \
    const int64_t L = DN_LANES_##SUF_, nb = rows - row0 < L ? rows - row0 : L;                       \
    ns_transpose_##SUF_((const T_ *)src, L, dst + row0 * n, n, n, nb);                               \
}                                                                                                    \
                                                                                                     \
/* Both directions: dy == NULL: the forward (y into out, sum |v| into *total), else the              \
 * backward (dx into out, sum dq into *total); total may be NULL. -1: out of memory. */              \
int ns_dn_rows_##SUF_(const T_ *x, const T_ *dy, int64_t rows, int64_t n, int64_t a, int64_t b,      \
                      double s, double g, T_ *out, double *total, int threads) {                     \
    if (n < 1 || rows < 1) {                                                                         \
        if (total) *total = 0;                                                                       \
        return 0;                                                                                    \
    }                                                                                                \
    if (a > n - 1) a = n - 1;                                                                        \
    if (b > n - 1) b = n - 1;                                                                        \
    const int64_t L = DN_LANES_##SUF_, groups = (rows + L - 1) / L;                                  \
    T_ *ia = (T_ *)malloc(sizeof(T_) * (size_t)(2 * n)); /* 1/cnt_a, 1/cnt_b */                      \
    double *per_row = (double *)malloc(sizeof(double) * (size_t)(groups * L));                       \
    int failed = !ia || !per_row;                                                                    \
    if (!failed) {                                                                                   \
        T_ *ib = ia + n;                                                                             \
        for (int64_t j = 0; j < n; j++) {                                                            \
            ia[j] = (T_)dn_inverse_count(n, a, j);                                                   \
            ib[j] = (T_)dn_inverse_count(n, b, j);                                                   \
        }                                                                                            \
        const T_ s_ = (T_)s, g_ = (T_)g;                                                             \
        const int at_once = (int64_t)sizeof(T_) * n * L <= DN_FETCH_AT_ONCE_MAX; /* dn_next_t */    \
        _Pragma("omp parallel num_threads(threads)")                                                 \
        {                                                                                            \
            int64_t ld = n + 4; /* arrays not a multiple of 4 KiB apart (store-load aliasing) */     \
            dn_v_##SUF_ *xv = (dn_v_##SUF_ *)ns_thread_scratch(sizeof(dn_v_##SUF_) * (size_t)(4 * ld), \
                                                               0, &failed);                          \
            dn_v_##SUF_ *dyv = xv + ld, *p = dyv + ld, *t = p + ld;                                  \
            _Pragma("omp for schedule(static)")                                                      \
            for (int64_t group = 0; group < groups; group++) {                                       \
                if (!xv) continue;                                                                   \
                const int64_t row0 = group * L, next_rows = rows - row0 - L;                         \
                const int64_t next_bytes = (int64_t)sizeof(T_) * n                                   \
                                           * (next_rows < L ? (next_rows > 0 ? next_rows : 0) : L);  \
                const dn_next_t ahead = { /* the next group's input, read while this one is computed */ \
                    (const char *)(x + (row0 + L) * n), dy ? (const char *)(dy + (row0 + L) * n) : NULL, \
                    (char *)(out + (row0 + L) * n), next_bytes, at_once};                            \
                dn_gather_##SUF_(x, row0, rows, n, xv);                                              \
                dn_v_##SUF_ sums;                                                                    \
                if (dy) {                                                                            \
                    dn_gather_##SUF_(dy, row0, rows, n, dyv);                                        \
                    sums = dn_backward_group_##SUF_(xv, dyv, n, a, b, s_, g_, ia, ib, p, t, &ahead);    \
                    dn_scatter_##SUF_(dyv, row0, rows, n, out);                                      \
                } else {                                                                             \
                    sums = dn_forward_group_##SUF_(xv, n, a, b, s_, ia, ib, p, t, &ahead);           \
                    dn_scatter_##SUF_(xv, row0, rows, n, out);                                       \
                }                                                                                    \
                for (int64_t l = 0; l < L; l++) per_row[row0 + l] = (double)sums[l];                 \
            }                                                                                        \
            free(xv);                                                                                \
        }                                                                                            \
        if (!failed && total) {                                                                      \
            double sum = 0;                                                                          \
            for (int64_t row = 0; row < rows; row++) sum += per_row[row];                            \
            *total = sum;                                                                            \
        }                                                                                            \
    }                                                                                                \
    free(ia);                                                                                        \
    free(per_row);                                                                                   \
    return failed ? -1 : 0;                                                                          \
}


NS_DIVISIVE(float, f32, INT32_MAX, dn_rsqrt_f32)
NS_DIVISIVE(double, f64, INT64_MAX, dn_rsqrt_f64)
#undef NS_DIVISIVE
