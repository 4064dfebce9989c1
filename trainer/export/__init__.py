"""Export a trained model to a verified bundle: ONNX FP32, INT8 QDQ, TensorRT engines."""
