"""The browser as an edge device: a draw-or-drop page that runs model.onnx with onnxruntime-web.

    index.html, app.js   the page: canvas, file drop, class, probabilities, the 28x28 input
    preprocessing.js     contract/preprocessing.py in the browser (tested against it)
    server.py, main.py   `python -m web`: the static server and the same-origin TorchServe proxy
"""
