// The CUDA kernel's device code (kernel_body.inc: lora_rite_cuda.cu up to its host entry point) behind the CPU
// kernel's entry point, lora_rite_step, so that LoRARITE drives it as it drives lora_rite_cpu.c.
#include "emu.h"
#include "kernel_body.inc"

extern "C" int lora_rite_step(int64_t npairs, int64_t n_in, int64_t n_out, const int64_t *operands,
                              const int64_t *state, const double *hyper, double *lam, int64_t lam_known,
                              double rel_tol) {
    emu_block_barrier = std::make_unique<std::barrier<>>(THREADS);
    emu_warp_barriers.clear();
    for (int w = 0; w < THREADS / 32; w++) emu_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    for (int64_t b = 0; b < npairs; b++) {
        std::vector<std::thread> threads;
        for (int t = 0; t < THREADS; t++)
            threads.emplace_back([=] {
                threadIdx.x = (unsigned)t;
                blockIdx.x = (unsigned)b;
                emu_parity = 0;
                lora_rite_kernel(npairs, n_in, n_out, operands, state, hyper, lam, (int)lam_known, rel_tol);
            });
        for (auto &t : threads) t.join();
    }
    return 0;
}
