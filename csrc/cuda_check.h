// CUDA error handling shared by the .cu files: one check_cuda, with the errors a user can fix
// (a GPU architecture not compiled in, a driver older than the static CUDA runtime) turned into
// a message that names the fix instead of a raw "no kernel image is available".
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace ff {

inline std::string cuda_error_message(cudaError_t err, const char* what) {
  std::string msg = std::string("fastflow._C: ") + what + ": " + cudaGetErrorString(err);
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    int dev = 0, major = 0, minor = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    msg += std::string(". fastflow's CUDA kernels were built for sm_") + FF_CUDA_ARCHS +
           " but this GPU is sm_" +
           std::to_string(major * 10 + minor) +
           ": reinstall with FASTFLOW_CUDA_ARCHITECTURES=" + std::to_string(major * 10 + minor) +
           " pip install --force-reinstall --no-build-isolation fastflow (or set "
           "FASTFLOW_BACKEND=reference)";
  } else if (err == cudaErrorInsufficientDriver || err == cudaErrorUnsupportedPtxVersion) {
    msg += ". The NVIDIA driver is older than the CUDA runtime fastflow was built with: update "
           "the driver, or rebuild fastflow with an older CUDA toolkit, or set "
           "FASTFLOW_BACKEND=reference";
  }
  return msg;
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    // clear the sticky-free error state so the next call does not report this one again
    cudaGetLastError();
    throw std::runtime_error(cuda_error_message(err, what));
  }
}

// Opt-in shared memory per block on the current device (bytes).
inline int64_t max_shared_per_block_optin() {
  int dev = 0, bytes = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  return int64_t(bytes);
}

}  // namespace ff
