// Command-line options of mf-classify.
#pragma once

#include <string>
#include <vector>

namespace mf {

struct Options {
  std::string folder;               // an mf-edge ExecuTorch output folder
  std::vector<std::string> images;  // JPEG/PNG files to classify
  std::string tensor;               // or: a raw float32 NCHW file of already preprocessed images
  std::string save_input;           // write the preprocessed float32 NCHW batch here
  int top = 5;
  int runs = 1;
  int warmup = 1;
  int threads = 0;  // 0: the runtime's default
  bool json = false;
};

extern const char* const kUsage;

// Parses argv; a bad command line throws UserError. `--help` prints the usage and exits 0.
Options parse_options(int argc, char** argv);

}  // namespace mf
