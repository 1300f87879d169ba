"""Core ML reference execution on Linux: run a saved ML Program (``.mlpackage``) with numpy.

Core ML's runtime exists only on Apple systems; this executor reads the package with coremltools'
own loader and runs its MIL program op by op following the MIL op specification, in fp16 where the
program is fp16 (with a report of fp16 range problems). ``load_reference(path).run(inputs)`` gives
the outputs by name; an op it does not implement raises ``UnsupportedOpError``.
"""

from mf_edge.coreml_reference.errors import UnsupportedOpError
from mf_edge.coreml_reference.fp16 import Finding, Report
from mf_edge.coreml_reference.interpreter import ReferenceProgram, load_reference
from mf_edge.coreml_reference.registry import supported_ops

__all__ = ["Finding", "ReferenceProgram", "Report", "UnsupportedOpError", "load_reference", "supported_ops"]
