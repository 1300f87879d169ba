// The ExecuTorch thread pool XNNPACK runs on.
//
// The executorch wheel ships libexecutorch_threadpool.so but not its header
// (extension/threadpool/threadpool.h upstream); these are the two declarations of it this program calls,
// copied in signature from that header.
#pragma once

#include <cstdint>

namespace executorch::extension::threadpool {

class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};

ThreadPool* get_threadpool();

}  // namespace executorch::extension::threadpool
