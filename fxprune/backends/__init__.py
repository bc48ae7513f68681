"""Where models are deployed and timed: engines (onnxruntime, torch, CUDA), ONNX export, timing graphs."""
