"""What the server runs a model on: torch, ONNX Runtime and TensorRT runners behind one protocol."""
