// Decoding JPEG and PNG files into 8-bit RGB pixels, as PIL's `Image.open(path).convert("RGB")` does.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mf {

struct RgbImage {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> pixels;  // row-major, 3 bytes (R, G, B) per pixel
};

// Decodes a JPEG (libjpeg) or PNG (libpng) file, chosen by its signature; anything else throws UserError.
RgbImage decode_image(const std::string& path);

}  // namespace mf
