/* LoRA-RITE optimizer step, fused, for CPUs: one call updates every (A, B) pair of a bucket.
 *
 * Yen et al., "LoRA Done RITE" (ICLR 2025, arXiv:2410.20625), Algorithm 1; the notation and every formula are
 * those of kernels/lora_rite.py's module docstring, whose batched torch implementation (`implementation="torch"`)
 * is this kernel's reference (tests/kernels/test_lora_rite_cpu.py: allclose in float64 and float32, over many
 * steps, from the singular B = 0 start, with weight decay and lagging pairs).
 *
 * Compiled at first use by kernels/cbuild.py with -DRANK=<r> -DREAL=<float|double> (the rank and the factors'
 * dtype are compile-time constants, as a Triton kernel's constexprs are), cached per machine.
 *
 * Per pair, three passes, each reading the pair's data once (it stays in L1/L2 between them):
 *   1. Grams (wide layout Z: Z_A = A, r×in; Z_B = Bᵀ, r×out):  Z_t Z_tᵀ, Z_t Z_{t-1}ᵀ, G Gᵀ, accumulated in REAL
 *      (the state dtype, as the torch path's bmm), and Z_t copied into the history slot of parity t % 2;
 *   2. the r×r algebra in double: R⁻¹ (Cholesky, or the eigendecomposition pseudo-inverse for (near-)singular
 *      Grams), P, ḡᵀḡ, transported second moment with escaped mass, K = (V̂ + ρ̂I)^{-1/2} (Jacobi eigensolver);
 *   3. the update  [Mᵀ_new; ΔZ] = [[β₁P, C'ᵀ], [s R⁻¹ β₁P, s R⁻¹ C'ᵀ]] · [Mᵀ; G]  and  Z ← (1 - lr·wd) Z - ΔZ,
 *      in one pass over the factor, its gradient and its first moment.
 * The A factors are processed in their own (r×in, row-major) layout, vectorized along `in`; the B factors in
 * theirs (out×r, row-major: a row of B is one r-vector), so nothing is transposed.
 *
 * Pointer table, 16 entries per pair (int64 addresses of contiguous tensors):
 *   0 A, 1 B, 2 grad A, 3 grad B, then for A (4..9) and B (10..15):
 *   step (float32 scalar), exp_avg (the factor's shape, REAL), exp_avg_sq (r×r double), escaped (double scalar),
 *   history (2 × the factor's shape, REAL), prev_rinv (r×r double).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef RANK
#error "compile with -DRANK=<LoRA rank>"
#endif
#ifndef REAL
#define REAL float
#endif

#define R RANK

typedef REAL real;
typedef double mat[R][R];

/* ---------------------------------------------------------------------------------------------------------- */
/* small dense r×r algebra (double)                                                                           */
/* ---------------------------------------------------------------------------------------------------------- */

static void mat_mul(mat out, const mat a, const mat b) { /* out = a b (out may not alias a or b) */
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            double s = 0.0;
            for (int k = 0; k < R; k++) s += a[i][k] * b[k][j];
            out[i][j] = s;
        }
}

static void mat_tmul(mat out, const mat a, const mat b) { /* out = aᵀ b */
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            double s = 0.0;
            for (int k = 0; k < R; k++) s += a[k][i] * b[k][j];
            out[i][j] = s;
        }
}

static void mat_mult(mat out, const mat a, const mat b) { /* out = a bᵀ */
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            double s = 0.0;
            for (int k = 0; k < R; k++) s += a[i][k] * b[j][k];
            out[i][j] = s;
        }
}

/* Eigen-decomposition of a symmetric matrix by Jacobi rotations in parallel (round-robin) order (Golub & Van
 * Loan, Matrix Computations, §8.5.5; accurate to rounding in every eigenvalue, small or large). Each round
 * zeroes ⌊r/2⌋ disjoint off-diagonal pairs at once, so their rotation angles are independent computations and
 * the similarity transform is two passes of row operations. `a` is destroyed; w: eigenvalues ascending; q (if
 * not NULL): eigenvectors as columns, in the same order. */
#define PLAYERS (R + (R & 1))
static void eigh(mat a, double w[R], mat q) {
    mat vt; /* eigenvectors as rows */
    int pos[PLAYERS];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) vt[i][j] = (i == j);
    for (int i = 0; i < PLAYERS; i++) pos[i] = i;
    for (int sweep = 0; sweep < 60; sweep++) {
        double off = 0.0, diag = 0.0;
        for (int i = 0; i < R; i++) {
            diag += a[i][i] * a[i][i];
            for (int j = i + 1; j < R; j++) off += a[i][j] * a[i][j];
        }
        if (off <= DBL_EPSILON * DBL_EPSILON * diag || off < DBL_MIN) break;
        for (int round = 0; round < PLAYERS - 1; round++) {
            /* the round's ⌊r/2⌋ rotations: angles computed side by side (vectorizable), negligible or phantom
             * pairs rotated by the identity (c = 1, s = 0 leaves every value exactly as it was) */
            int pp[PLAYERS / 2], qq[PLAYERS / 2];
            double apr[PLAYERS / 2], app[PLAYERS / 2], arr[PLAYERS / 2];
            double cs[PLAYERS / 2], sn[PLAYERS / 2], dp[PLAYERS / 2], dq[PLAYERS / 2], zero[PLAYERS / 2];
            for (int k = 0; k < PLAYERS / 2; k++) {
                int p = pos[k], r = pos[PLAYERS - 1 - k];
                if (p > r) { int x = p; p = r; r = x; }
                int real_pair = r < R;
                if (!real_pair) r = p; /* the phantom player of an odd r: a harmless self-pair */
                pp[k] = p; qq[k] = r;
                apr[k] = real_pair ? a[p][r] : 0.0;
                app[k] = a[p][p];
                arr[k] = a[r][r];
            }
            for (int k = 0; k < PLAYERS / 2; k++) {
                double x = apr[k];
                int rotate = !(x * x <= DBL_EPSILON * DBL_EPSILON * 1e-2 * fabs(app[k] * arr[k]) || fabs(x) < DBL_MIN);
                double safe = rotate ? x : 1.0;
                double theta = (arr[k] - app[k]) / (2.0 * safe);
                double t = isfinite(theta * theta) ? (theta >= 0.0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0))
                                                   : 0.5 / theta;
                t = rotate ? t : 0.0;
                double c = 1.0 / sqrt(t * t + 1.0);
                cs[k] = c; sn[k] = t * c;
                dp[k] = app[k] - t * x; dq[k] = arr[k] + t * x;
                zero[k] = rotate ? 0.0 : x;
            }
            for (int k = 0; k < PLAYERS / 2; k++) { /* rows: a ← Jᵀ a, vt ← Jᵀ vt */
                int p = pp[k], r = qq[k];
                if (p == r) continue;
                double c = cs[k], s = sn[k];
                for (int j = 0; j < R; j++) {
                    double x = a[p][j], y = a[r][j];
                    a[p][j] = c * x - s * y;
                    a[r][j] = s * x + c * y;
                    double u = vt[p][j], v = vt[r][j];
                    vt[p][j] = c * u - s * v;
                    vt[r][j] = s * u + c * v;
                }
            }
            for (int i = 0; i < R; i++) /* columns: a ← a J */
                for (int k = 0; k < PLAYERS / 2; k++) {
                    int p = pp[k], r = qq[k];
                    if (p == r) continue;
                    double c = cs[k], s = sn[k], x = a[i][p], y = a[i][r];
                    a[i][p] = c * x - s * y;
                    a[i][r] = s * x + c * y;
                }
            for (int k = 0; k < PLAYERS / 2; k++) { /* the rotated 2×2 blocks, exactly */
                if (pp[k] == qq[k]) continue;
                a[pp[k]][pp[k]] = dp[k];
                a[qq[k]][qq[k]] = dq[k];
                a[pp[k]][qq[k]] = a[qq[k]][pp[k]] = zero[k];
            }
            int last = pos[PLAYERS - 1]; /* next round: player 0 stays, the others move one seat */
            for (int k = PLAYERS - 1; k > 1; k--) pos[k] = pos[k - 1];
            pos[1] = last;
        }
    }
    int order[R];
    for (int i = 0; i < R; i++) order[i] = i;
    for (int i = 1; i < R; i++) { /* insertion sort by eigenvalue */
        int o = order[i], j = i;
        while (j > 0 && a[order[j - 1]][order[j - 1]] > a[o][o]) { order[j] = order[j - 1]; j--; }
        order[j] = o;
    }
    for (int i = 0; i < R; i++) w[i] = a[order[i]][order[i]];
    if (q)
        for (int i = 0; i < R; i++)
            for (int j = 0; j < R; j++) q[i][j] = vt[order[j]][i];
}

static void sym_eigvals(const mat x, double w[R]) { /* eigenvalues of sym(x), ascending */
    mat a;
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) a[i][j] = 0.5 * (x[i][j] + x[j][i]);
    eigh(a, w, NULL);
}

/* R⁻¹ for Zᵀ = U R (U orthonormal) given the Gram Z Zᵀ = RᵀR: L⁻ᵀ from the Cholesky factor L where the Gram is
 * safely positive definite (every pivot² > rel_tol · trace); else the pseudo-inverse Q Λ^{-1/2} with directions
 * λ ≤ rel_tol · λ_max dropped. */
static void inv_factor(const mat gram, double rel_tol, mat rinv) {
    mat l;
    double trace = 0.0;
    int ok = 1;
    for (int i = 0; i < R; i++) trace += gram[i][i];
    memset(l, 0, sizeof(mat));
    for (int j = 0; j < R && ok; j++) {
        double d = gram[j][j];
        for (int k = 0; k < j; k++) d -= l[j][k] * l[j][k];
        if (!(d > 0.0) || d <= trace * rel_tol) { ok = 0; break; } /* pivot² = d */
        double ljj = sqrt(d);
        l[j][j] = ljj;
        for (int i = j + 1; i < R; i++) {
            double s = gram[i][j];
            for (int k = 0; k < j; k++) s -= l[i][k] * l[j][k];
            l[i][j] = s / ljj;
        }
    }
    if (ok) { /* rinv = L⁻ᵀ (upper triangular): solve Lᵀ X = I column by column, back substitution */
        memset(rinv, 0, sizeof(mat));
        for (int c = 0; c < R; c++)
            for (int i = c; i >= 0; i--) {
                double s = (i == c) ? 1.0 : 0.0;
                for (int k = i + 1; k <= c; k++) s -= l[k][i] * rinv[k][c];
                rinv[i][c] = s / l[i][i];
            }
        return;
    }
    mat a, q;
    double lam[R];
    memcpy(a, gram, sizeof(mat));
    eigh(a, lam, q);
    double cut = (lam[R - 1] > 0.0 ? lam[R - 1] : 0.0) * rel_tol;
    for (int j = 0; j < R; j++) {
        double f = lam[j] > cut ? 1.0 / sqrt(lam[j] > DBL_MIN ? lam[j] : DBL_MIN) : 0.0;
        for (int i = 0; i < R; i++) rinv[i][j] = q[i][j] * f;
    }
}

/* ---------------------------------------------------------------------------------------------------------- */
/* the passes over the factors                                                                                */
/* ---------------------------------------------------------------------------------------------------------- */

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
 * that the work runs along a row of X. Rows go in pairs, whose accumulations are independent. */
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
    for (; k + 2 <= n; k += 2) {
        real *m0 = m + k * R, *m1 = m0 + R;
        const real *g0 = g + k * R, *g1 = g0 + R;
        tvec om0[RT], om1[RT], od0[RT], od1[RT];
        for (int c = 0; c < RT; c++) {
            om0[c] = tc[0][c] * m0[0]; od0[c] = bc[0][c] * m0[0];
            om1[c] = tc[0][c] * m1[0]; od1[c] = bc[0][c] * m1[0];
        }
        for (int j = 1; j < 2 * R; j++) {
            real a0 = j < R ? m0[j] : g0[j - R], a1 = j < R ? m1[j] : g1[j - R];
            for (int c = 0; c < RT; c++) {
                om0[c] += tc[j][c] * a0; od0[c] += bc[j][c] * a0;
                om1[c] += tc[j][c] * a1; od1[c] += bc[j][c] * a1;
            }
        }
        for (int c = 0; c < RT; c++) {
            real *x0 = x + k * R + c * TLANES, *x1 = x0 + R;
            tstore(m0 + c * TLANES, om0[c]);
            tstore(m1 + c * TLANES, om1[c]);
            tstore(x0, keep * tload(x0) - od0[c]);
            tstore(x1, keep * tload(x1) - od1[c]);
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
/* one factor's r×r algebra                                                                                   */
/* ---------------------------------------------------------------------------------------------------------- */

typedef struct {
    double beta1, beta2, eps, lr, rel_tol;
} hyper;

/* Side s (the factor being updated) with partner o. In: the partner's Gram and cross product, its R⁻¹ at the
 * previous step; this side's G Gᵀ, V, ρ, step t and length n_s; `lam`: the eigenvalues of V if `lam_known`
 * (the last step's eigendecomposition left them; else they are computed here with the same routine, so a
 * reloaded optimizer steps exactly as the original). Out: the coefficients `top` = [β₁P, C'ᵀ],
 * `step` = S = lr/bc₁ R_o⁻¹ and `bottom` = S top (REAL; the wide update applies S to the new moment, the tall one
 * uses bottom), the new V, ρ and λ(V) (written to the state), and the partner's R⁻¹ now (for the caller to
 * store once both sides are done). */
static void side_algebra(const hyper *hp, const mat gram_o, const mat cross_o, const mat rinv_o_prev,
                         const mat gg_s, double *v_state, double *rho_state, double *lam, int lam_known,
                         double t, double n_s, real top[R][2 * R], real step[R][R], real bottom[R][2 * R],
                         mat rinv_o) {
    mat tmp, p, s, vm, vn, half, q, kmat, c;
    double lam_m[R];
    const double (*v)[R] = (const double (*)[R])v_state;

    inv_factor(gram_o, hp->rel_tol, rinv_o);
    mat_tmul(tmp, rinv_o, cross_o); /* P = R_o⁻ᵀ (Z_o Z_o,prevᵀ) R_o,prev⁻¹ */
    mat_mul(p, tmp, rinv_o_prev);
    mat_tmul(tmp, rinv_o, gg_s); /* ḡᵀḡ = R_o⁻ᵀ (G Gᵀ) R_o⁻¹ */
    mat_mul(s, tmp, rinv_o);

    if (!lam_known) sym_eigvals(v, lam);
    mat_mul(tmp, p, v); /* V moved into the current basis: P V Pᵀ */
    mat_mult(vm, tmp, p);
    sym_eigvals(vm, lam_m);
    double eig_gap = -INFINITY, trace_gap = 0.0;
    for (int i = 0; i < R; i++) {
        double d = lam[i] - lam_m[i];
        if (d > eig_gap) eig_gap = d;
        trace_gap += v[i][i] - vm[i][i];
    }
    double escaped = eig_gap < trace_gap ? eig_gap : trace_gap;
    double rho = hp->beta2 * (*rho_state + (escaped > 0.0 ? escaped : 0.0));

    double sscale = 0.5 * (1.0 - hp->beta2) / n_s, vscale = 0.5 * hp->beta2;
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) half[i][j] = s[i][j] * sscale + vm[i][j] * vscale;
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) vn[i][j] = half[i][j] + half[j][i]; /* sym((1-β₂) ḡᵀḡ/n_s + β₂ P V Pᵀ) */
    memcpy(v_state, vn, sizeof(mat));
    *rho_state = rho;

    double bc1 = 1.0 - pow(hp->beta1, t), bc2 = 1.0 - pow(hp->beta2, t);
    eigh(vn, lam, q); /* vn destroyed (the state has its copy); λ kept for the next step */
    double inv[R];
    for (int i = 0; i < R; i++)
        inv[i] = (1.0 - hp->beta1) / (sqrt(((lam[i] > 0.0 ? lam[i] : 0.0) + rho) / bc2) + hp->eps);
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            double acc = 0.0;
            for (int k = 0; k < R; k++) acc += q[i][k] * inv[k] * q[j][k];
            kmat[i][j] = acc; /* (1-β₁) (V̂ + ρ̂ I)^{-1/2}, ε on the square roots */
        }
    mat_mul(c, rinv_o, kmat); /* C' = (1-β₁) R_o⁻¹ K */
    double step_scale = hp->lr / bc1, topd[R][2 * R];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            topd[i][j] = hp->beta1 * p[i][j];
            topd[i][R + j] = c[j][i];
            step[i][j] = (real)(rinv_o[i][j] * step_scale);
        }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < 2 * R; j++) {
            double acc = 0.0;
            for (int k = 0; k < R; k++) acc += rinv_o[i][k] * topd[k][j];
            top[i][j] = (real)topd[i][j];
            bottom[i][j] = (real)(acc * step_scale);
        }
}

/* ---------------------------------------------------------------------------------------------------------- */
/* entry point                                                                                                */
/* ---------------------------------------------------------------------------------------------------------- */

/* One step for `npairs` pairs of shapes A (r, n_in), B (n_out, r). `lam`: (2·npairs, r) doubles, the
 * eigenvalues of each factor's V (A rows first), valid if `lam_known` and written back. Returns 0. */
int lora_rite_step(int64_t npairs, int64_t n_in, int64_t n_out, const int64_t *ptrs, double *lam, int64_t lam_known,
                   double lr, double beta1, double beta2, double eps, double weight_decay, double rel_tol) {
    hyper hp = {beta1, beta2, eps, lr, rel_tol};
    real keep = (real)(1.0 - lr * weight_decay);
    for (int64_t pi = 0; pi < npairs; pi++) {
        const int64_t *pp = ptrs + 16 * pi;
        real *a = (real *)(intptr_t)pp[0], *b = (real *)(intptr_t)pp[1];
        const real *ga = (const real *)(intptr_t)pp[2], *gb = (const real *)(intptr_t)pp[3];
        float *stepc[2] = {(float *)(intptr_t)pp[4], (float *)(intptr_t)pp[10]};
        real *m[2] = {(real *)(intptr_t)pp[5], (real *)(intptr_t)pp[11]};
        double *v[2] = {(double *)(intptr_t)pp[6], (double *)(intptr_t)pp[12]};
        double *rho[2] = {(double *)(intptr_t)pp[7], (double *)(intptr_t)pp[13]};
        real *hist[2] = {(real *)(intptr_t)pp[8], (real *)(intptr_t)pp[14]};
        double *prev_rinv[2] = {(double *)(intptr_t)pp[9], (double *)(intptr_t)pp[15]};
        double *lams[2] = {lam + pi * R, lam + (npairs + pi) * R};
        int64_t size[2] = {R * n_in, n_out * R};
        double t[2];
        int h[2];
        mat gram[2], cross[2], gg[2];
        for (int f = 0; f < 2; f++) { /* this step's factor into the history slot of its parity */
            t[f] = (double)(*stepc[f] += 1.0f);
            h[f] = (int)(((int64_t)t[f]) % 2);
            memcpy(hist[f] + h[f] * size[f], f ? (const real *)b : (const real *)a, sizeof(real) * size[f]);
        }
        grams_wide(a, hist[0] + (1 - h[0]) * size[0], ga, n_in, gram[0], cross[0], gg[0]);
        grams_tall(b, hist[1] + (1 - h[1]) * size[1], gb, n_out, gram[1], cross[1], gg[1]);
        real top[2][R][2 * R], step[2][R][R], bottom[2][R][2 * R];
        mat rinv[2]; /* rinv[f]: R⁻¹ of factor f now, computed by the other side */
        for (int f = 0; f < 2; f++) {
            int o = 1 - f;
            side_algebra(&hp, gram[o], cross[o], (const double (*)[R])prev_rinv[o], gg[f], v[f], rho[f], lams[f],
                         (int)lam_known, t[f], (double)(f ? n_out : n_in), top[f], step[f], bottom[f], rinv[o]);
        }
        memcpy(prev_rinv[0], rinv[0], sizeof(mat));
        memcpy(prev_rinv[1], rinv[1], sizeof(mat));
        update_wide(a, m[0], ga, n_in, (const real (*)[2 * R])top[0], (const real (*)[R])step[0], keep);
        update_tall(b, m[1], gb, n_out, (const real (*)[2 * R])top[1], (const real (*)[2 * R])bottom[1], keep);
    }
    return 0;
}
