#include "resample.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "errors.h"

namespace mf {

namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // Pillow's PRECISION_BITS for 8-bit images
constexpr double kPi = 3.14159265358979323846;

struct Filter {
  double (*weight)(double);
  double support;
};

double box(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }

double bilinear(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

double hamming(double x) {
  x = std::fabs(x);
  if (x == 0.0) return 1.0;
  if (x >= 1.0) return 0.0;
  x *= kPi;
  return std::sin(x) / x * (0.54f + 0.46f * std::cos(x));  // Pillow's float constants
}

double bicubic(double x) {
  constexpr double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

double sinc(double x) {
  if (x == 0.0) return 1.0;
  x *= kPi;
  return std::sin(x) / x;
}

double lanczos(double x) { return (x > -3.0 && x < 3.0) ? sinc(x) * sinc(x / 3) : 0.0; }

bool find_filter(const std::string& name, Filter* filter) {
  if (name == "box") *filter = {box, 0.5};
  else if (name == "bilinear") *filter = {bilinear, 1.0};
  else if (name == "hamming") *filter = {hamming, 1.0};
  else if (name == "bicubic") *filter = {bicubic, 2.0};
  else if (name == "lanczos") *filter = {lanczos, 3.0};
  else return false;
  return true;
}

// For each output position: the first input index, the number of taps and their fixed-point weights.
struct Coefficients {
  int taps = 0;                 // the row stride of `weights`
  std::vector<int> first, count;
  std::vector<int32_t> weights;
};

Coefficients precompute(int in_size, int out_size, const Filter& filter) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filter_scale = std::max(scale, 1.0);
  const double support = filter.support * filter_scale;
  const double inverse_scale = 1.0 / filter_scale;
  Coefficients c;
  c.taps = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.first.resize(out_size);
  c.count.resize(out_size);
  c.weights.assign(static_cast<size_t>(out_size) * c.taps, 0);
  std::vector<double> k(c.taps);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const int xmin = std::max(static_cast<int>(center - support + 0.5), 0);
    const int xmax = std::min(static_cast<int>(center + support + 0.5), in_size) - xmin;
    double total = 0.0;
    for (int x = 0; x < xmax; ++x) {
      k[x] = filter.weight((x + xmin - center + 0.5) * inverse_scale);
      total += k[x];
    }
    for (int x = 0; x < xmax; ++x) {
      const double w = total != 0.0 ? k[x] / total : k[x];
      c.weights[static_cast<size_t>(xx) * c.taps + x] =
          static_cast<int32_t>(w < 0 ? -0.5 + w * (1 << kPrecisionBits) : 0.5 + w * (1 << kPrecisionBits));
    }
    c.first[xx] = xmin;
    c.count[xx] = xmax;
  }
  return c;
}

uint8_t clip8(int32_t value) {
  if (value >= (1 << kPrecisionBits << 8)) return 255;
  if (value <= 0) return 0;
  return static_cast<uint8_t>(value >> kPrecisionBits);
}

RgbImage resample_horizontal(const RgbImage& in, int width, const Coefficients& c) {
  RgbImage out{width, in.height, std::vector<uint8_t>(static_cast<size_t>(width) * in.height * 3)};
  for (int y = 0; y < in.height; ++y) {
    const uint8_t* row = in.pixels.data() + static_cast<size_t>(y) * in.width * 3;
    uint8_t* dst = out.pixels.data() + static_cast<size_t>(y) * width * 3;
    for (int xx = 0; xx < width; ++xx) {
      const int32_t* k = c.weights.data() + static_cast<size_t>(xx) * c.taps;
      int32_t sum[3] = {1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1)};
      for (int x = 0; x < c.count[xx]; ++x) {
        const uint8_t* px = row + static_cast<size_t>(x + c.first[xx]) * 3;
        for (int ch = 0; ch < 3; ++ch) sum[ch] += px[ch] * k[x];
      }
      for (int ch = 0; ch < 3; ++ch) dst[xx * 3 + ch] = clip8(sum[ch]);
    }
  }
  return out;
}

RgbImage resample_vertical(const RgbImage& in, int height, const Coefficients& c) {
  RgbImage out{in.width, height, std::vector<uint8_t>(static_cast<size_t>(in.width) * height * 3)};
  const size_t stride = static_cast<size_t>(in.width) * 3;
  for (int yy = 0; yy < height; ++yy) {
    const int32_t* k = c.weights.data() + static_cast<size_t>(yy) * c.taps;
    uint8_t* dst = out.pixels.data() + yy * stride;
    for (size_t i = 0; i < stride; ++i) {
      int32_t sum = 1 << (kPrecisionBits - 1);
      for (int y = 0; y < c.count[yy]; ++y) sum += in.pixels[(y + c.first[yy]) * stride + i] * k[y];
      dst[i] = clip8(sum);
    }
  }
  return out;
}

// Pillow's NEAREST is an affine scale (Geometry.c, ImagingScaleAffine): source positions accumulated from
// the first output centre, truncated.
std::vector<int> nearest_positions(int in_size, int out_size) {
  const double step = static_cast<double>(in_size) / out_size;
  std::vector<int> positions(out_size);
  double position = step * 0.5;
  for (int i = 0; i < out_size; ++i, position += step) positions[i] = std::min(static_cast<int>(position), in_size - 1);
  return positions;
}

RgbImage resize_nearest(const RgbImage& in, int width, int height) {
  RgbImage out{width, height, std::vector<uint8_t>(static_cast<size_t>(width) * height * 3)};
  const std::vector<int> xs = nearest_positions(in.width, width), ys = nearest_positions(in.height, height);
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      std::copy_n(&in.pixels[(static_cast<size_t>(ys[y]) * in.width + xs[x]) * 3], 3,
                  &out.pixels[(static_cast<size_t>(y) * width + x) * 3]);
    }
  }
  return out;
}

}  // namespace

bool is_known_interpolation(const std::string& interpolation) {
  Filter filter{};
  return interpolation == "nearest" || find_filter(interpolation, &filter);
}

RgbImage resize(const RgbImage& image, int width, int height, const std::string& interpolation) {
  if (width == image.width && height == image.height) return image;
  if (interpolation == "nearest") return resize_nearest(image, width, height);
  Filter filter{};
  if (!find_filter(interpolation, &filter)) {
    throw UserError("unknown interpolation '" + interpolation + "' in the manifest");
  }
  // Pillow's Resample.c order: horizontal pass (only where the width changes), then vertical. Pillow 13.0
  // runs the vertical pass first for some shapes (tall images among them); there a pixel can differ by one
  // grey level from it (apps/executorch_cpp/README.md).
  RgbImage result = width != image.width
      ? resample_horizontal(image, width, precompute(image.width, width, filter)) : image;
  if (height != image.height) result = resample_vertical(result, height, precompute(image.height, height, filter));
  return result;
}

RgbImage crop(const RgbImage& image, int left, int top, int width, int height) {
  RgbImage out{width, height, std::vector<uint8_t>(static_cast<size_t>(width) * height * 3)};
  for (int y = 0; y < height; ++y) {
    std::copy_n(&image.pixels[(static_cast<size_t>(y + top) * image.width + left) * 3], static_cast<size_t>(width) * 3,
                &out.pixels[static_cast<size_t>(y) * width * 3]);
  }
  return out;
}

}  // namespace mf
