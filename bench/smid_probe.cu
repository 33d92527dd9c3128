// Where does the hardware place a grid's blocks? Each block records its SM (%smid) and holds it long enough for
// every block of the grid to be resident at once; run with 3, 2 and 1 blocks per SM (sized by shared memory, as the
// grouped GEMM's decode, narrow and prefill tiles are). Build and run on the GPU machine:
//   nvcc -O2 -arch=sm_90a -Icsrc bench/smid_probe.cu -o /tmp/smid_probe && /tmp/smid_probe
// Result on an H100 (bench/NOTES_experts.md, eighth session): with 3 blocks per SM, blocks 0, 32 and 88 share an
// SM, so a persistent grid's tile t does not run on SM t mod SMs.
#include "cuda_check.h"

#include <cstdio>
#include <map>
#include <vector>

__global__ void record_sm(int* sm_of_block) {
  unsigned smid;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
  if (threadIdx.x == 0) sm_of_block[blockIdx.x] = static_cast<int>(smid);
  const long long t0 = clock64();
  while (clock64() - t0 < 2000000) {
  }
}

int main() {  // a CUDA error ends it with the failing call's message (EP_CUDA_CHECK throws)
  const int sms = ep::num_sms();
  EP_CUDA_CHECK(cudaFuncSetAttribute(record_sm, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  for (int per_sm : {3, 2, 1}) {
    const int smem = per_sm == 3 ? 72 * 1024 : per_sm == 2 ? 100 * 1024 : 200 * 1024;
    int fits = 0;
    EP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fits, record_sm, 288, smem));
    const int grid = sms * per_sm;
    int* d = nullptr;
    EP_CUDA_CHECK(cudaMalloc(&d, grid * sizeof(int)));
    record_sm<<<grid, 288, smem>>>(d);
    EP_CHECK_LAUNCH();
    std::vector<int> sm(grid);
    EP_CUDA_CHECK(cudaMemcpy(sm.data(), d, grid * sizeof(int), cudaMemcpyDeviceToHost));
    EP_CUDA_CHECK(cudaFree(d));
    std::map<int, std::vector<int>> blocks_of;
    int in_order = 0;
    for (int b = 0; b < grid; ++b) {
      blocks_of[sm[b]].push_back(b);
      in_order += sm[b] == sm[b % sms];
    }
    std::printf("%d blocks per SM (occupancy allows %d), grid %d on %zu SMs\n", per_sm, fits, grid, blocks_of.size());
    std::printf("  SMs of blocks 0-39:");
    for (int b = 0; b < 40; ++b) std::printf(" %d", sm[b]);
    std::printf("\n  blocks on the SM of block b %% %d: %d of %d\n  the SM of block 0 holds blocks:", sms, in_order,
                grid);
    for (int b : blocks_of[sm[0]]) std::printf(" %d", b);
    std::printf("\n");
  }
  return 0;
}
