#include "options.h"

#include <cstdio>
#include <cstdlib>
#include <string>

#include "errors.h"

namespace mf {

const char* const kUsage =
    "usage: mf-classify FOLDER IMAGE... [--top K] [--runs N] [--warmup W] [--threads T] [--json]\n"
    "       mf-classify FOLDER --tensor FILE [options]\n"
    "\n"
    "Classify images with an mf-edge ExecuTorch output folder (model.pte, manifest.json, labels.txt).\n"
    "\n"
    "  IMAGE...          JPEG or PNG files, preprocessed as the folder's manifest says\n"
    "  --tensor FILE     raw float32 NCHW input instead of images (already preprocessed; N from its size)\n"
    "  --save-input FILE write the preprocessed float32 NCHW batch to FILE\n"
    "  --top K           classes per image (default 5)\n"
    "  --runs N          timed runs per batch; the latency printed is their median (default 1)\n"
    "  --warmup W        untimed runs per batch before them (default 1)\n"
    "  --threads T       XNNPACK threads (default: the runtime's choice)\n"
    "  --json            print JSON instead of text\n";

namespace {

int parse_int(const std::string& flag, const std::string& value, int minimum) {
  char* end = nullptr;
  const long parsed = std::strtol(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || parsed < minimum || parsed > 1000000) {
    throw UserError(flag + " takes an integer >= " + std::to_string(minimum) + ", got '" + value + "'");
  }
  return static_cast<int>(parsed);
}

}  // namespace

Options parse_options(int argc, char** argv) {
  Options options;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UserError(arg + " needs a value; see mf-classify --help");
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (arg == "--top") {
      options.top = parse_int(arg, value(), 1);
    } else if (arg == "--runs") {
      options.runs = parse_int(arg, value(), 1);
    } else if (arg == "--warmup") {
      options.warmup = parse_int(arg, value(), 0);
    } else if (arg == "--threads") {
      options.threads = parse_int(arg, value(), 1);
    } else if (arg == "--tensor") {
      options.tensor = value();
    } else if (arg == "--save-input") {
      options.save_input = value();
    } else if (arg == "--json") {
      options.json = true;
    } else if (arg.size() > 1 && arg[0] == '-') {
      throw UserError("unknown option " + arg + "; see mf-classify --help");
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.empty()) throw UserError("no output folder given; usage: mf-classify FOLDER IMAGE...");
  options.folder = positional.front();
  options.images.assign(positional.begin() + 1, positional.end());
  if (options.images.empty() == options.tensor.empty()) {
    throw UserError("pass either images or --tensor FILE after the folder; usage: mf-classify FOLDER IMAGE...");
  }
  return options;
}

}  // namespace mf
