// Host emulation of the CUDA features that kernels/lora_rite_cuda.cu's kernel uses, for testing its device code on
// machines without a GPU: one OS thread per CUDA thread, the blocks one after another, __shared__ variables as
// statics (one block at a time shares them), __syncthreads as a block barrier, __shfl_down_sync through a
// per-warp exchange buffer (two buffers alternate, so one barrier per exchange suffices).
#pragma once
#include <barrier>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static

struct emu_dim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline thread_local emu_dim3 threadIdx, blockIdx;
inline std::unique_ptr<std::barrier<>> emu_block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> emu_warp_barriers;
inline double emu_exchange[32][2][32]; // [warp][parity][lane]
inline thread_local int emu_parity = 0;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

template <class T> inline T __shfl_down_sync(unsigned, T x, int offset) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    emu_exchange[warp][emu_parity][lane] = (double)x; // float and double values pass through double exactly
    emu_warp_barriers[warp]->arrive_and_wait();
    const T y = lane + offset < 32 ? (T)emu_exchange[warp][emu_parity][lane + offset] : x;
    emu_parity ^= 1;
    return y;
}
