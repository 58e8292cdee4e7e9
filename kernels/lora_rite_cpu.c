/* LoRA-RITE optimizer step, fused, for CPUs: one call updates every (A, B) pair of a bucket.
 *
 * Yen et al., "LoRA Done RITE" (ICLR 2025, arXiv:2410.20625), Algorithm 1; the notation and every formula are
 * those of kernels/lora_rite.py's module docstring, whose batched torch implementation (`implementation="torch"`)
 * is this kernel's reference (tests/kernels/test_lora_rite_cpu.py: allclose in float64 and float32, over many
 * steps, from the singular B = 0 start, with weight decay and lagging pairs).
 *
 * Compiled at first use by kernels/cbuild.py with -DRANK=<r> -DREAL=<float|double> -DTLANES=<lanes> (the rank
 * and the factors' dtype are compile-time constants, as a Triton kernel's constexprs are), cached per machine.
 *
 * Pairs go two at a time (four factors: their data, ~0.5 MB at r = 8, d = 768, stays in L2 between the passes):
 *   1. per factor, Z_t into the history slot of parity t % 2 (streaming stores), and the Grams (wide layout Z:
 *      Z_A = A, r×in; Z_B = Bᵀ, r×out)  Z_t Z_tᵀ, Z_t Z_{t-1}ᵀ, G Gᵀ, accumulated in REAL (the state dtype, as the
 *      torch route's bmm), in register tiles;
 *   2. the r×r algebra of the four factors in float64, one per lane of a 4-double vector: R⁻¹ (Cholesky, or the
 *      eigendecomposition pseudo-inverse for (near-)singular Grams), P, ḡᵀḡ, transported second moment with
 *      escaped mass, K = (V̂ + ρ̂I)^{-1/2} (Jacobi eigensolver, round-robin order);
 *   3. per factor, one pass over the factor, its gradient and its first moment:  Mᵀ ← [β₁P, C'ᵀ] [Mᵀ; G],
 *      ΔZ = s R⁻¹ Mᵀ (s = lr/bc₁),  Z ← (1 - lr·wd) Z - ΔZ.
 * The A factors are processed in their own (r×in, row-major) layout, vectorized along `in`; the B factors in
 * theirs (out×r, row-major: a row of B is one r-vector), so nothing is transposed. Measured on this project's
 * VM (AMD EPYC, Zen 1: one 8-wide float multiply-add per cycle; 1 thread; benchmarks/optimizers.py): 48 pairs
 * r = 8, d = 768 — 4.1 ms a step against 11 ms for the torch route and 2.5–2.6 ms for torch's fused AdamW. Of the
 * C time (~3.5 ms) the passes take ~2.6 ms and are bound by their multiply-adds, not by memory (as fast per pair
 * with every operand in cache): ~45 per element of a factor at r = 8 (Grams ~20, update 24), at 65–90 % of the
 * core's peak; the r×r algebra ~0.8 ms (two 4-lane eigendecompositions per two pairs, ~0.6 ms). Tried and not
 * kept: the history copy fused into the Gram pass (its streaming stores slowed the tall pass), prefetching the
 * next pairs during the algebra (slower), threads (twice as fast alone, slower inside a training loop, where
 * torch's OpenMP workers still spin on the cores after the backward pass).
 *
 * `hyper` holds each pair's lr, β₁, β₂, ε and weight decay, so pairs of one shape share a call whatever their
 * hyper-parameters (an lr schedule, per-group settings), each lane of the algebra using its own.
 *
 * Addresses (int64, of contiguous tensors): `operands`, 4 per pair: A, B, grad A, grad B; `state`, 12 per pair,
 * for A (0..5) and B (6..11): step (float32 scalar), exp_avg (the factor's shape, REAL), exp_avg_sq (r×r double),
 * escaped (double scalar), history (2 × the factor's shape, REAL), prev_rinv (r×r double).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#ifndef RANK
#error "compile with -DRANK=<LoRA rank>"
#endif
#ifndef REAL
#define REAL float
#endif

#define R RANK

typedef REAL real;
typedef double mat[R][R];

/* Vectors (GCC/Clang vector extensions, lowered to whatever the target has): `vec` runs along n in the wide
 * layout, `tvec` along a row of r values in the tall one (TLANES = the largest power of two ≤ 32 bytes that
 * divides r, passed by the builder). Unaligned loads and stores go through memcpy, which compiles to one
 * unaligned vector move. */
#ifndef TLANES
#define TLANES 1
#endif
#define NV (32 / (int)sizeof(real))
#define RT (R / TLANES)
typedef real vec __attribute__((vector_size(32)));
typedef real tvec __attribute__((vector_size(TLANES * sizeof(real))));

static inline vec vload(const real *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(real *p, vec v) { memcpy(p, &v, sizeof v); }
static inline tvec tload(const real *p) { tvec v; memcpy(&v, p, sizeof v); return v; }
static inline void tstore(real *p, tvec v) { memcpy(p, &v, sizeof v); }

/* Ask for `count` elements at p ahead of their use (the passes are short streams, which the hardware prefetchers
 * pick up late). */
static inline void prefetch(const void *p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch((const char *)p + o, 0, 3);
}

/* dst ← src (count elements), bypassing the caches where the target can: the history slot is read again only
 * at the next step, after every other factor has gone through the caches, and a normal store would first read
 * the slot's old contents in. */
static void copy_stream(real *restrict dst, const real *restrict src, int64_t count) {
#ifdef __AVX__
    const int64_t lanes = 32 / (int64_t)sizeof(real);
    int64_t k = 0;
    while (k < count && ((uintptr_t)(dst + k) & 31)) { dst[k] = src[k]; k++; }
    for (; k + lanes <= count; k += lanes) {
        __m256 x;
        memcpy(&x, src + k, 32);
        _mm256_stream_ps((float *)(dst + k), x);
    }
    for (; k < count; k++) dst[k] = src[k];
    _mm_sfence();
#else
    memcpy(dst, src, sizeof(real) * count);
#endif
}

/* acc[a][b] = Σ_k X[i0+a, k] Y[j0+b, k] over the first n0 (a multiple of NV) columns, lanes kept apart:
 * a 2×4 tile of dot products whose eight accumulators stay in registers. */
static inline void dot_tile(const real *restrict x, const real *restrict y, int64_t n, int64_t n0, int i0, int j0,
                            vec acc[2][4]) {
    vec s00 = {0}, s01 = {0}, s02 = {0}, s03 = {0}, s10 = {0}, s11 = {0}, s12 = {0}, s13 = {0};
    const real *x0 = x + i0 * n, *x1 = x + (i0 + 1) * n;
    const real *y0 = y + j0 * n, *y1 = y + (j0 + 1) * n, *y2 = y + (j0 + 2) * n, *y3 = y + (j0 + 3) * n;
    for (int64_t k = 0; k < n0; k += NV) {
        vec a0 = vload(x0 + k), a1 = vload(x1 + k), b;
        b = vload(y0 + k); s00 += a0 * b; s10 += a1 * b;
        b = vload(y1 + k); s01 += a0 * b; s11 += a1 * b;
        b = vload(y2 + k); s02 += a0 * b; s12 += a1 * b;
        b = vload(y3 + k); s03 += a0 * b; s13 += a1 * b;
    }
    acc[0][0] = s00; acc[0][1] = s01; acc[0][2] = s02; acc[0][3] = s03;
    acc[1][0] = s10; acc[1][1] = s11; acc[1][2] = s12; acc[1][3] = s13;
}

/* out = X Yᵀ for wide X, Y (r×n); `sym`: Y = X, only the tiles on or below the diagonal are computed. */
static void wide_product(const real *restrict x, const real *restrict y, int64_t n, int sym, mat out) {
    int64_t n0 = n - n % NV;
#if R % 4 == 0
    for (int i0 = 0; i0 < R; i0 += 2)
        for (int j0 = 0; j0 < R; j0 += 4) {
            if (sym && j0 > i0 + 1) continue;
            vec acc[2][4];
            dot_tile(x, y, n, n0, i0, j0, acc);
            for (int a = 0; a < 2; a++)
                for (int b = 0; b < 4; b++) {
                    real s = 0;
                    for (int l = 0; l < NV; l++) s += acc[a][b][l];
                    out[i0 + a][j0 + b] = s;
                }
        }
#else
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            if (sym && j > i) continue;
            vec acc = {0};
            for (int64_t k = 0; k < n0; k += NV) acc += vload(x + i * n + k) * vload(y + j * n + k);
            real s = 0;
            for (int l = 0; l < NV; l++) s += acc[l];
            out[i][j] = s;
        }
#endif
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            if (sym && j > i) continue;
            real s = 0;
            for (int64_t k = n0; k < n; k++) s += x[i * n + k] * y[j * n + k];
            out[i][j] = (real)out[i][j] + s; /* the accumulation stays in REAL, as the torch route's bmm */
            if (sym) out[j][i] = out[i][j];
        }
}

/* Wide Z (r×n, row-major): gram = Z Zᵀ, cross = Z Zpᵀ, gg = G Gᵀ. */
static void grams_wide(const real *restrict z, const real *restrict zp, const real *restrict g, int64_t n,
                       mat gram, mat cross, mat gg) {
    wide_product(z, z, n, 1, gram);
    wide_product(z, zp, n, 0, cross);
    wide_product(g, g, n, 1, gg);
}

/* Tall X = Zᵀ (n×r, row-major; row k is the r-vector x_k): gram = Σ x_k x_kᵀ, cross = Σ x_k xp_kᵀ, gg likewise. */
static void grams_tall(const real *restrict x, const real *restrict xp, const real *restrict g, int64_t n,
                       mat gram, mat cross, mat gg) {
    tvec sg[R][RT], sc[R][RT], sgg[R][RT];
    memset(sg, 0, sizeof sg);
    memset(sc, 0, sizeof sc);
    memset(sgg, 0, sizeof sgg);
    for (int64_t k = 0; k < n; k++) { /* Gram and cross product */
        const real *xk = x + k * R, *xpk = xp + k * R;
        tvec xv[RT], xpv[RT];
        for (int c = 0; c < RT; c++) { xv[c] = tload(xk + c * TLANES); xpv[c] = tload(xpk + c * TLANES); }
        for (int i = 0; i < R; i++)
            for (int c = 0; c < RT; c++) { sg[i][c] += xk[i] * xv[c]; sc[i][c] += xk[i] * xpv[c]; }
    }
    for (int64_t k = 0; k < n; k++) { /* G Gᵀ */
        const real *gk = g + k * R;
        tvec gv[RT];
        for (int c = 0; c < RT; c++) gv[c] = tload(gk + c * TLANES);
        for (int i = 0; i < R; i++)
            for (int c = 0; c < RT; c++) sgg[i][c] += gk[i] * gv[c];
    }
    for (int i = 0; i < R; i++)
        for (int c = 0; c < RT; c++)
            for (int l = 0; l < TLANES; l++) {
                gram[i][c * TLANES + l] = sg[i][c][l];
                cross[i][c * TLANES + l] = sc[i][c][l];
                gg[i][c * TLANES + l] = sgg[i][c][l];
            }
}

/* Wide update: per column k, m ← top [m; g] (r×2r times 2r), z ← keep·z − S m with the new m (S = lr/bc₁ R⁻¹). */
static void update_wide(real *restrict z, real *restrict m, const real *restrict g, int64_t n,
                        const real top[R][2 * R], const real step[R][R], real keep) {
    int64_t k0 = 0;
    for (; k0 + NV <= n; k0 += NV) {
        vec in[2 * R], om[R];
        for (int j = 0; j < R; j++) { in[j] = vload(m + j * n + k0); in[R + j] = vload(g + j * n + k0); }
#if R % 4 == 0
        /* four output rows per pass over the inputs: each input vector loaded once feeds four FMAs */
        for (int i = 0; i < R; i += 4) {
            vec a0 = in[0] * top[i][0], a1 = in[0] * top[i + 1][0], a2 = in[0] * top[i + 2][0],
                a3 = in[0] * top[i + 3][0];
            for (int j = 1; j < 2 * R; j++) {
                vec x = in[j];
                a0 += x * top[i][j]; a1 += x * top[i + 1][j]; a2 += x * top[i + 2][j]; a3 += x * top[i + 3][j];
            }
            om[i] = a0; om[i + 1] = a1; om[i + 2] = a2; om[i + 3] = a3;
        }
        for (int i = 0; i < R; i++) vstore(m + i * n + k0, om[i]);
        for (int i = 0; i < R; i += 4) {
            vec d0 = om[0] * step[i][0], d1 = om[0] * step[i + 1][0], d2 = om[0] * step[i + 2][0],
                d3 = om[0] * step[i + 3][0];
            for (int j = 1; j < R; j++) {
                vec x = om[j];
                d0 += x * step[i][j]; d1 += x * step[i + 1][j]; d2 += x * step[i + 2][j]; d3 += x * step[i + 3][j];
            }
            real *zi = z + i * n + k0;
            vstore(zi, keep * vload(zi) - d0);
            vstore(zi + n, keep * vload(zi + n) - d1);
            vstore(zi + 2 * n, keep * vload(zi + 2 * n) - d2);
            vstore(zi + 3 * n, keep * vload(zi + 3 * n) - d3);
        }
#else
        for (int i = 0; i < R; i++) {
            vec acc = in[0] * top[i][0];
            for (int j = 1; j < 2 * R; j++) acc += in[j] * top[i][j];
            om[i] = acc;
            vstore(m + i * n + k0, acc);
        }
        for (int i = 0; i < R; i++) {
            vec od = om[0] * step[i][0];
            for (int j = 1; j < R; j++) od += om[j] * step[i][j];
            vstore(z + i * n + k0, keep * vload(z + i * n + k0) - od);
        }
#endif
    }
    for (int64_t k = k0; k < n; k++) {
        real in[2 * R], om[R];
        for (int j = 0; j < R; j++) { in[j] = m[j * n + k]; in[R + j] = g[j * n + k]; }
        for (int i = 0; i < R; i++) {
            real acc = 0;
            for (int j = 0; j < 2 * R; j++) acc += top[i][j] * in[j];
            om[i] = acc;
            m[i * n + k] = acc;
        }
        for (int i = 0; i < R; i++) {
            real od = 0;
            for (int j = 0; j < R; j++) od += step[i][j] * om[j];
            z[i * n + k] = keep * z[i * n + k] - od;
        }
    }
}

/* Tall update: per row k, m_k ← top [m_k; g_k], x_k ← keep·x_k − bottom [m_k; g_k] (bottom = S top, so that no
 * result waits on another), with the coefficient matrices' columns as r-vectors (tc[j] = column j of top) so
 * that the work runs along a row of X. Rows go in fours: each coefficient vector loaded feeds four rows' FMAs,
 * whose accumulations are independent. */
static void update_tall(real *restrict x, real *restrict m, const real *restrict g, int64_t n,
                        const real top[R][2 * R], const real bottom[R][2 * R], real keep) {
    tvec tc[2 * R][RT], bc[2 * R][RT];
    for (int c = 0; c < RT; c++)
        for (int l = 0; l < TLANES; l++)
            for (int j = 0; j < 2 * R; j++) {
                tc[j][c][l] = top[c * TLANES + l][j];
                bc[j][c][l] = bottom[c * TLANES + l][j];
            }
    int64_t k = 0;
    for (; k + 4 <= n; k += 4) {
        tvec om[4][RT], od[4][RT];
        const real *mb = m + k * R, *gb = g + k * R;
        for (int b = 0; b < 4; b++)
            for (int c = 0; c < RT; c++) { om[b][c] = tc[0][c] * mb[b * R]; od[b][c] = bc[0][c] * mb[b * R]; }
        for (int j = 1; j < 2 * R; j++) {
            const real *src = j < R ? mb + j : gb + (j - R);
            for (int c = 0; c < RT; c++) {
                tvec t = tc[j][c], u = bc[j][c];
                for (int b = 0; b < 4; b++) { real a = src[b * R]; om[b][c] += t * a; od[b][c] += u * a; }
            }
        }
        for (int b = 0; b < 4; b++)
            for (int c = 0; c < RT; c++) {
                real *xk = x + (k + b) * R + c * TLANES;
                tstore(m + (k + b) * R + c * TLANES, om[b][c]);
                tstore(xk, keep * tload(xk) - od[b][c]);
            }
    }
    for (; k < n; k++) {
        real *mk = m + k * R;
        const real *gk = g + k * R;
        tvec om[RT], od[RT];
        for (int c = 0; c < RT; c++) { om[c] = tc[0][c] * mk[0]; od[c] = bc[0][c] * mk[0]; }
        for (int j = 1; j < 2 * R; j++) {
            real a = j < R ? mk[j] : gk[j - R];
            for (int c = 0; c < RT; c++) { om[c] += tc[j][c] * a; od[c] += bc[j][c] * a; }
        }
        for (int c = 0; c < RT; c++) {
            real *xk = x + k * R + c * TLANES;
            tstore(mk + c * TLANES, om[c]);
            tstore(xk, keep * tload(xk) - od[c]);
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------- */
/* the r×r algebra of four factors at once                                                                   */
/* ---------------------------------------------------------------------------------------------------------- */

/* The r×r algebra (float64) dominates once the passes are vectorized: eigendecompositions in particular are
 * chains of dependent scalar operations. It runs for four factors (two pairs) at once, one per lane of a
 * 4-double vector, every lane doing exactly what it would alone (a Jacobi lane that has converged is frozen),
 * so the results do not depend on which factors share a batch. */
#define LN 4
typedef double v4 __attribute__((vector_size(LN * sizeof(double))));
typedef v4 vmat[R][R];

static inline v4 vsplat(double x) { return (v4){x, x, x, x}; }
static inline v4 vsqrt(v4 x) { v4 r = x; for (int l = 0; l < LN; l++) r[l] = sqrt(x[l]); return r; }
static inline v4 vabs(v4 x) { v4 r = x; for (int l = 0; l < LN; l++) r[l] = fabs(x[l]); return r; }
static inline v4 vmax(v4 a, v4 b) { v4 r = a; for (int l = 0; l < LN; l++) r[l] = a[l] > b[l] ? a[l] : b[l]; return r; }
static inline v4 vmin(v4 a, v4 b) { v4 r = a; for (int l = 0; l < LN; l++) r[l] = a[l] < b[l] ? a[l] : b[l]; return r; }
static inline v4 vsign(v4 x) { v4 r = x; for (int l = 0; l < LN; l++) r[l] = x[l] >= 0.0 ? 1.0 : -1.0; return r; }
static inline v4 vflag(v4 a, v4 b) { v4 r = a; for (int l = 0; l < LN; l++) r[l] = a[l] <= b[l]; return r; } /* 1.0 where a ≤ b */

static void vmat_mul(vmat out, vmat a, vmat b) { /* out = a b */
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            v4 acc = a[i][0] * b[0][j];
            for (int k = 1; k < R; k++) acc += a[i][k] * b[k][j];
            out[i][j] = acc;
        }
}

static void vmat_tmul(vmat out, vmat a, vmat b) { /* out = aᵀ b */
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            v4 acc = a[0][i] * b[0][j];
            for (int k = 1; k < R; k++) acc += a[k][i] * b[k][j];
            out[i][j] = acc;
        }
}

static void vmat_mult(vmat out, vmat a, vmat b) { /* out = a bᵀ */
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            v4 acc = a[i][0] * b[j][0];
            for (int k = 1; k < R; k++) acc += a[i][k] * b[j][k];
            out[i][j] = acc;
        }
}

/* Eigendecomposition of four symmetric matrices, one per lane, by Jacobi rotations in parallel (round-robin)
 * order (Golub & Van Loan, Matrix Computations, §8.5.5; accurate to rounding in every eigenvalue, small or
 * large). Each round zeroes ⌊r/2⌋ disjoint off-diagonal pairs at once, so their angles are independent
 * computations. `a` is destroyed. Out: w[l][·] ascending and, if q is not NULL, q[l] with the eigenvectors as
 * columns in that order. */
#define PLAYERS (R + (R & 1))
static void eigh4(vmat a, double w[LN][R], mat q[LN]) {
    vmat vt;
    int pos[PLAYERS];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) vt[i][j] = vsplat(i == j);
    for (int i = 0; i < PLAYERS; i++) pos[i] = i;
    v4 done = vsplat(0.0);
    const v4 tiny = vsplat(DBL_MIN), eps2 = vsplat(DBL_EPSILON * DBL_EPSILON);
    for (int sweep = 0; sweep < 60; sweep++) {
        v4 off = vsplat(0.0), diag = vsplat(0.0);
        for (int i = 0; i < R; i++) {
            diag += a[i][i] * a[i][i];
            for (int j = i + 1; j < R; j++) off += a[i][j] * a[i][j];
        }
        /* a lane is done (and stays so) once its off-diagonal mass is negligible: what it would decide alone */
        v4 converged = vmax(vflag(off, eps2 * diag), 1.0 - vflag(tiny, off)); /* off ≤ ε² diag, or off < tiny */
        done = vmax(done, converged);
        if (done[0] + done[1] + done[2] + done[3] == LN) break;
        v4 live = 1.0 - done;
        for (int round = 0; round < PLAYERS - 1; round++) {
            int pp[PLAYERS / 2], qq[PLAYERS / 2];
            v4 cs[PLAYERS / 2], sn[PLAYERS / 2], dp[PLAYERS / 2], dq[PLAYERS / 2], zero[PLAYERS / 2];
            for (int k = 0; k < PLAYERS / 2; k++) {
                int p = pos[k], r = pos[PLAYERS - 1 - k];
                if (p > r) { int x = p; p = r; r = x; }
                if (r >= R) r = p; /* the phantom player of an odd r: no rotation */
                pp[k] = p; qq[k] = r;
                if (p == r) continue;
                v4 apr = a[p][r], app = a[p][p], arr = a[r][r];
                /* rotate (1.0) unless apr is negligible beside the diagonal, or tiny, or the lane is done */
                v4 rot = (1.0 - vflag(apr * apr, eps2 * 1e-2 * vabs(app * arr))) * (1.0 - vflag(vabs(apr), tiny)) * live;
                v4 safe = rot * apr + (1.0 - rot);
                v4 theta = (arr - app) / (2.0 * safe);
                v4 t = rot * vsign(theta) / (vabs(theta) + vsqrt(theta * theta + 1.0));
                v4 c = 1.0 / vsqrt(t * t + 1.0);
                cs[k] = c; sn[k] = t * c;
                dp[k] = app - t * apr; dq[k] = arr + t * apr;
                zero[k] = (1.0 - rot) * apr;
            }
            /* a ← Jᵀ a J entry by entry, each symmetric pair of entries computed once: the 2×2 blocks between
             * two rotated pairs turn on both sides, the entries beside the unpaired index of an odd r on one */
            for (int k = 0; k < PLAYERS / 2; k++) {
                int p = pp[k], r = qq[k];
                if (p == r) continue;
                v4 ck = cs[k], sk = sn[k];
                for (int l = 0; l < PLAYERS / 2; l++) {
                    int u = pp[l], w = qq[l];
                    if (l == k || (u != w && l < k)) continue;
                    v4 apu = a[p][u], aru = a[r][u];
                    v4 bpu = ck * apu - sk * aru, bru = sk * apu + ck * aru; /* rows p, r turned */
                    if (u == w) { /* u unpaired: its column is not turned */
                        a[p][u] = a[u][p] = bpu;
                        a[r][u] = a[u][r] = bru;
                        continue;
                    }
                    v4 apw = a[p][w], arw = a[r][w];
                    v4 bpw = ck * apw - sk * arw, brw = sk * apw + ck * arw;
                    v4 cl = cs[l], sl = sn[l]; /* then columns u, w */
                    a[p][u] = a[u][p] = cl * bpu - sl * bpw;
                    a[p][w] = a[w][p] = sl * bpu + cl * bpw;
                    a[r][u] = a[u][r] = cl * bru - sl * brw;
                    a[r][w] = a[w][r] = sl * bru + cl * brw;
                }
                a[p][p] = dp[k]; /* the rotated 2×2 block itself, exactly */
                a[r][r] = dq[k];
                a[p][r] = a[r][p] = zero[k];
                if (q)
                    for (int j = 0; j < R; j++) { /* vt ← Jᵀ vt */
                        v4 x = vt[p][j], y = vt[r][j];
                        vt[p][j] = ck * x - sk * y;
                        vt[r][j] = sk * x + ck * y;
                    }
            }
            int last = pos[PLAYERS - 1]; /* next round: player 0 stays, the others move one seat */
            for (int k = PLAYERS - 1; k > 1; k--) pos[k] = pos[k - 1];
            pos[1] = last;
        }
    }
    for (int l = 0; l < LN; l++) {
        int order[R];
        for (int i = 0; i < R; i++) order[i] = i;
        for (int i = 1; i < R; i++) { /* insertion sort by eigenvalue */
            int o = order[i], j = i;
            while (j > 0 && a[order[j - 1]][order[j - 1]][l] > a[o][o][l]) { order[j] = order[j - 1]; j--; }
            order[j] = o;
        }
        for (int i = 0; i < R; i++) w[l][i] = a[order[i]][order[i]][l];
        if (q)
            for (int i = 0; i < R; i++)
                for (int j = 0; j < R; j++) q[l][i][j] = vt[order[j]][i][l];
    }
}

/* R⁻¹ for four Grams Z Zᵀ = RᵀR, one per lane: L⁻ᵀ from the Cholesky factor L (R = Lᵀ, QR's R up to signs)
 * where the Gram is safely positive definite (every pivot² > rel_tol · trace), else the pseudo-inverse. */
static void inv_factor4(vmat gram, double rel_tol, vmat rinv) {
    vmat l;
    v4 trace = vsplat(0.0), ok = vsplat(1.0);
    for (int i = 0; i < R; i++) trace += gram[i][i];
    for (int j = 0; j < R; j++) {
        v4 d = gram[j][j];
        for (int k = 0; k < j; k++) d -= l[j][k] * l[j][k];
        ok *= 1.0 - vflag(d, trace * rel_tol); /* pivot² ≤ rel_tol · trace (or not > 0, NaN included): singular */
        ok *= vflag(d, d);                     /* NaN */
        v4 ljj = vsqrt(vmax(d, vsplat(DBL_MIN)));
        l[j][j] = ljj;
        for (int i = j + 1; i < R; i++) {
            v4 s = gram[i][j];
            for (int k = 0; k < j; k++) s -= l[i][k] * l[j][k];
            l[i][j] = s / ljj;
        }
        for (int i = 0; i < j; i++) l[i][j] = vsplat(0.0);
    }
    for (int c = 0; c < R; c++) /* rinv = L⁻ᵀ: back substitution, column by column */
        for (int i = R - 1; i >= 0; i--) {
            if (i > c) { rinv[i][c] = vsplat(0.0); continue; }
            v4 s = vsplat(i == c ? 1.0 : 0.0);
            for (int k = i + 1; k <= c; k++) s -= l[k][i] * rinv[k][c];
            rinv[i][c] = s / l[i][i];
        }
    if (ok[0] + ok[1] + ok[2] + ok[3] == LN) return;
    /* a (near-)singular Gram, e.g. B = 0 at initialization: the pseudo-inverse Q Λ^{-1/2}, directions with
     * λ ≤ rel_tol · λ_max dropped (as the authors' pinv) */
    vmat a;
    double w[LN][R];
    mat q[LN];
    memcpy(a, gram, sizeof(vmat));
    eigh4(a, w, q);
    for (int ln = 0; ln < LN; ln++) {
        if (ok[ln] == 1.0) continue;
        double cut = (w[ln][R - 1] > 0.0 ? w[ln][R - 1] : 0.0) * rel_tol;
        for (int j = 0; j < R; j++) {
            double f = w[ln][j] > cut ? 1.0 / sqrt(w[ln][j] > DBL_MIN ? w[ln][j] : DBL_MIN) : 0.0;
            for (int i = 0; i < R; i++) rinv[i][j][ln] = q[ln][i][j] * f;
        }
    }
}

/* What one factor's r×r algebra reads and writes. Side s is the factor being updated, o its partner. */
typedef struct {
    const double *gram_o, *cross_o, *rinv_o_prev, *gg_s; /* r×r: the partner's Gram, cross product, last R⁻¹; G Gᵀ */
    double *v, *rho, *lam;                                /* state: V, ρ; λ(V) (cached: see lam_known) */
    const double *hyper;                                  /* the pair's lr, β₁, β₂, ε, weight decay */
    double t, n_s;                                        /* step count, the factor's length */
    real *top, *step, *bottom;                            /* out: r×2r, r×r, r×2r coefficients of the passes */
    double *rinv_o;                                       /* out: the partner's R⁻¹ now (r×r) */
} side;

/* Four sides at once (`count` ≤ 4 real ones; the other lanes compute on a copy of the first and are dropped).
 * Per side: R_o⁻¹; P = R_o⁻ᵀ (Z_o Z_o,prevᵀ) R_o,prev⁻¹; ḡᵀḡ = R_o⁻ᵀ (G Gᵀ) R_o⁻¹; V transported with escaped
 * mass; K = (V̂ + ρ̂ I)^{-1/2} (ε on the square roots); the coefficients top = [β₁P, C'ᵀ] with C' = (1-β₁) R_o⁻¹ K,
 * step = lr/bc₁ R_o⁻¹ and bottom = step · top. `lam_known`: λ(V) is the last step's (else computed here with
 * the same routine, so that a reloaded optimizer steps exactly as the original). */
static void side_algebra4(side *sd, int count, int lam_known, double rel_tol) {
    vmat gram, cross, rprev, gg, v, rinv, tmp, p, s, vm, vn, kmat, c;
    v4 rho, t, n_s, lam[R], lr, beta1, beta2, eps;
    double w[LN][R];
    mat q[LN];
    for (int l = 0; l < LN; l++) {
        const side *x = &sd[l < count ? l : 0];
        for (int i = 0; i < R; i++)
            for (int j = 0; j < R; j++) {
                gram[i][j][l] = x->gram_o[i * R + j];
                cross[i][j][l] = x->cross_o[i * R + j];
                rprev[i][j][l] = x->rinv_o_prev[i * R + j];
                gg[i][j][l] = x->gg_s[i * R + j];
                v[i][j][l] = x->v[i * R + j];
            }
        rho[l] = *x->rho;
        lr[l] = x->hyper[0];
        beta1[l] = x->hyper[1];
        beta2[l] = x->hyper[2];
        eps[l] = x->hyper[3];
        t[l] = x->t;
        n_s[l] = x->n_s;
        for (int i = 0; i < R; i++) lam[i][l] = x->lam[i];
    }
    inv_factor4(gram, rel_tol, rinv);
    vmat_tmul(tmp, rinv, cross);
    vmat_mul(p, tmp, rprev);
    vmat_tmul(tmp, rinv, gg);
    vmat_mul(s, tmp, rinv);

    if (!lam_known) {
        for (int i = 0; i < R; i++)
            for (int j = 0; j < R; j++) tmp[i][j] = 0.5 * (v[i][j] + v[j][i]);
        eigh4(tmp, w, NULL);
        for (int i = 0; i < R; i++)
            for (int l = 0; l < LN; l++) lam[i][l] = w[l][i];
    }
    vmat_mul(tmp, p, v); /* V moved into the current basis: P V Pᵀ */
    vmat_mult(vm, tmp, p);
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) tmp[i][j] = 0.5 * (vm[i][j] + vm[j][i]);
    eigh4(tmp, w, NULL);
    v4 eig_gap = vsplat(-INFINITY), trace_gap = vsplat(0.0);
    for (int i = 0; i < R; i++) {
        v4 lm = {w[0][i], w[1][i], w[2][i], w[3][i]};
        eig_gap = vmax(eig_gap, lam[i] - lm);
        trace_gap += v[i][i] - vm[i][i];
    }
    rho = beta2 * (rho + vmax(vmin(eig_gap, trace_gap), vsplat(0.0)));

    v4 sscale = 0.5 * (1.0 - beta2) / n_s, vscale = 0.5 * beta2;
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) tmp[i][j] = s[i][j] * sscale + vm[i][j] * vscale;
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) vn[i][j] = tmp[i][j] + tmp[j][i]; /* sym((1-β₂) ḡᵀḡ/n_s + β₂ P V Pᵀ) */
    for (int l = 0; l < count; l++) {
        for (int i = 0; i < R; i++)
            for (int j = 0; j < R; j++) sd[l].v[i * R + j] = vn[i][j][l];
        *sd[l].rho = rho[l];
    }

    v4 bc1, bc2;
    for (int l = 0; l < LN; l++) { bc1[l] = 1.0 - pow(beta1[l], t[l]); bc2[l] = 1.0 - pow(beta2[l], t[l]); }
    eigh4(vn, w, q); /* λ kept for the next step */
    v4 inv[R];
    for (int i = 0; i < R; i++) {
        v4 li = {w[0][i], w[1][i], w[2][i], w[3][i]};
        inv[i] = (1.0 - beta1) / (vsqrt((vmax(li, vsplat(0.0)) + rho) / bc2) + eps);
        for (int l = 0; l < count; l++) sd[l].lam[i] = w[l][i];
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            v4 acc = vsplat(0.0);
            for (int k = 0; k < R; k++) {
                v4 qik = {q[0][i][k], q[1][i][k], q[2][i][k], q[3][i][k]};
                v4 qjk = {q[0][j][k], q[1][j][k], q[2][j][k], q[3][j][k]};
                acc += qik * inv[k] * qjk;
            }
            kmat[i][j] = acc; /* (1-β₁) (V̂ + ρ̂ I)^{-1/2} */
        }
    vmat_mul(c, rinv, kmat); /* C' = (1-β₁) R_o⁻¹ K */
    v4 step_scale = lr / bc1;
    v4 topd[R][2 * R];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) { topd[i][j] = beta1 * p[i][j]; topd[i][R + j] = c[j][i]; }
    v4 bottom[R][2 * R]; /* step · top = lr/bc₁ R_o⁻¹ top */
    for (int i = 0; i < R; i++)
        for (int j = 0; j < 2 * R; j++) {
            v4 acc = rinv[i][0] * topd[0][j];
            for (int k = 1; k < R; k++) acc += rinv[i][k] * topd[k][j];
            bottom[i][j] = acc * step_scale;
        }
    for (int l = 0; l < count; l++) {
        side *x = &sd[l];
        for (int i = 0; i < R; i++) {
            for (int j = 0; j < R; j++) {
                x->step[i * R + j] = (real)(rinv[i][j][l] * step_scale[l]);
                x->rinv_o[i * R + j] = rinv[i][j][l];
            }
            for (int j = 0; j < 2 * R; j++) {
                x->top[i * 2 * R + j] = (real)topd[i][j][l];
                x->bottom[i * 2 * R + j] = (real)bottom[i][j][l];
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------- */
/* entry point                                                                                                */
/* ---------------------------------------------------------------------------------------------------------- */

/* One step for `npairs` pairs of shapes A (r, n_in), B (n_out, r), two pairs (four factors) at a time: their
 * Grams, their r×r algebra in the four lanes, their updates. `hyper`: 5 doubles per pair (lr, β₁, β₂, ε, weight
 * decay). `lam`: (2·npairs, r) doubles, the eigenvalues of each factor's V (A rows first), valid if `lam_known`
 * and written back. `rel_tol`: the pseudo-inverse threshold. Returns 0. */
int lora_rite_step(int64_t npairs, int64_t n_in, int64_t n_out, const int64_t *operands, const int64_t *state,
                   const double *hyper, double *lam, int64_t lam_known, double rel_tol) {
    for (int64_t p0 = 0; p0 < npairs; p0 += 2) {
        int count = npairs - p0 >= 2 ? 2 : 1;
        real *fac[2][2], *m[2][2], *hist[2][2];
        const real *grad[2][2];
        double *v[2][2], *rho[2][2], *prev_rinv[2][2], t[2][2];
        mat gram[2][2], cross[2][2], gg[2][2], rinv[2][2];
        real top[2][2][R][2 * R], step[2][2][R][R], bottom[2][2][R][2 * R];
        side sd[4];
        for (int c = 0; c < count; c++) {
            int64_t pi = p0 + c;
            const int64_t *pp = operands + 4 * pi;
            for (int f = 0; f < 2; f++) { /* f = 0: A (wide), 1: B (tall) */
                const int64_t *st = state + 12 * pi + 6 * f;
                int64_t size = f ? n_out * R : R * n_in;
                fac[c][f] = (real *)(intptr_t)pp[f];
                grad[c][f] = (const real *)(intptr_t)pp[2 + f];
                float *stepc = (float *)(intptr_t)st[0];
                m[c][f] = (real *)(intptr_t)st[1];
                v[c][f] = (double *)(intptr_t)st[2];
                rho[c][f] = (double *)(intptr_t)st[3];
                hist[c][f] = (real *)(intptr_t)st[4];
                prev_rinv[c][f] = (double *)(intptr_t)st[5];
                t[c][f] = (double)(*stepc += 1.0f);
                int h = (int)(((int64_t)t[c][f]) % 2); /* this step's factor into the history slot of its parity */
                const real *prev = hist[c][f] + (1 - h) * size;
                copy_stream(hist[c][f] + h * size, fac[c][f], size);
                if (f)
                    grams_tall(fac[c][f], prev, grad[c][f], n_out, gram[c][f], cross[c][f], gg[c][f]);
                else
                    grams_wide(fac[c][f], prev, grad[c][f], n_in, gram[c][f], cross[c][f], gg[c][f]);
            }
            for (int f = 0; f < 2; f++) {
                int o = 1 - f;
                sd[2 * c + f] = (side){&gram[c][o][0][0], &cross[c][o][0][0], prev_rinv[c][o], &gg[c][f][0][0],
                                       v[c][f], rho[c][f], lam + (f * npairs + p0 + c) * R, hyper + 5 * (p0 + c),
                                       t[c][f], (double)(f ? n_out : n_in), &top[c][f][0][0], &step[c][f][0][0],
                                       &bottom[c][f][0][0], &rinv[c][o][0][0]};
            }
        }
        for (int c = 0; c < count; c++) /* the first moments, in flight during the r×r algebra */
            for (int f = 0; f < 2; f++) prefetch(m[c][f], sizeof(real) * (f ? n_out * R : R * n_in));
        side_algebra4(sd, 2 * count, (int)lam_known, rel_tol);
        for (int c = 0; c < count; c++) {
            const double *hp = hyper + 5 * (p0 + c);
            real keep = (real)(1.0 - hp[0] * hp[4]); /* decoupled weight decay: 1 - lr·wd */
            memcpy(prev_rinv[c][0], rinv[c][0], sizeof(mat));
            memcpy(prev_rinv[c][1], rinv[c][1], sizeof(mat));
            update_wide(fac[c][0], m[c][0], grad[c][0], n_in, (const real (*)[2 * R])top[c][0],
                        (const real (*)[R])step[c][0], keep);
            update_tall(fac[c][1], m[c][1], grad[c][1], n_out, (const real (*)[2 * R])top[c][1],
                        (const real (*)[2 * R])bottom[c][1], keep);
        }
    }
    return 0;
}
