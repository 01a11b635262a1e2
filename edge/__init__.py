"""onnxruntime side: sessions that use the device they were asked for (torch-free)."""
