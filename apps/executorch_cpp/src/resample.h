// Pillow's `Image.resize` for 8-bit RGB, reimplemented to give the same bytes.
//
// Pillow resamples in two separable passes (horizontal, then vertical) with a filter whose support grows
// with the downscale factor (antialiasing), fixed-point coefficients with 22 fractional bits and an 8-bit
// clip after each pass (Pillow's src/libImaging/Resample.c). Reproducing that, not an approximation of
// it, is what lets the app feed the network the same bytes as the Python eval transform (checked against
// Pillow 13.0 in tests/test_native_app.py; see resize() for the one case where Pillow 13 orders the passes
// differently).
#pragma once

#include <string>

#include "image.h"

namespace mf {

// The interpolations Pillow names: nearest, box, bilinear, hamming, bicubic, lanczos.
bool is_known_interpolation(const std::string& interpolation);

// `image` resized to width x height as Pillow's `image.resize((width, height), interpolation)` does.
RgbImage resize(const RgbImage& image, int width, int height, const std::string& interpolation);

// The `width` x `height` window at (`left`, `top`) of `image` (inside it).
RgbImage crop(const RgbImage& image, int left, int top, int width, int height);

}  // namespace mf
