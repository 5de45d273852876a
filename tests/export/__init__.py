"""Export and verification: ONNX FP32/INT8, .ort, .pte, the manifest and accuracy guard, the latency cache."""
