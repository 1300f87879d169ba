"""Post-training quantization to ExecuTorch: the int8 and w8 programs are one XNNPACK delegate and
compute what their PyTorch simulation computes (trained ConvFormer/CAFormer int8 at 32 px, random
IdentityFormer w8 at 64 px; the thresholds and the trained fixture are explained in ``test_ptq.py``).
A module of its own so that pytest-xdist runs these lowerings beside ``test_ptq.py``'s ONNX ones.
"""

from __future__ import annotations

import pytest

from mf_edge.pipeline import convert

from ptq_checks import CALIB, SIZE, TRAINED_SIZE, check_manifest, check_quantized_parity, fp32_bytes

pytestmark = pytest.mark.usefixtures("quiet_with_own_cache")


@pytest.mark.parametrize(("name", "precision"), [("convformer_s18", "int8"), ("caformer_s18", "int8"),
                                                 ("identityformer_s12", "w8")])
def test_executorch_quantized_is_delegated_to_xnnpack(name, precision, trained_weights, calib_dir, parity_dir,
                                                      tmp_path):
    int8 = precision == "int8"
    weights, size = (trained_weights(name), TRAINED_SIZE) if int8 else ("random", SIZE)
    ptq = {"calib_data": calib_dir, "calib_size": CALIB} if int8 else {}
    result = convert(name, "executorch", precision, weights=weights, image_size=size,
                     images=parity_dir, output=tmp_path / "out", ptq_options=ptq)
    check_quantized_parity(result, precision)
    # int8: every conv and linear int8 but depthwise; w8 (dynamic int8 linears): the convolutions stay fp32
    limit = 0.30 if int8 else 0.40
    scheme = "xnnpack-w8a8" if int8 else "xnnpack-dynamic-w8"
    check_manifest(result, scheme, limit * fp32_bytes(name, weights, size))
    # The README's promise: the whole int8/w8 graph, quantize/dequantize included, is one XNNPACK
    # delegate (measured: ConvFormer int8 933 ops, CAFormer int8 1525, IdentityFormer w8 544, none
    # outside). The old bar, coverage > 0.95, let 46 of ConvFormer's ops fall back to portable kernels.
    delegation = result.manifest["details"]["delegation"]
    assert delegation["non_delegated"] == {} and delegation["non_delegated_ops"] == 0, delegation
    assert delegation["coverage"] == 1.0 and delegation["delegated_subgraphs"] == 1, delegation
