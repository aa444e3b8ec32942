"""``kdad-export ckpt_path=PATH``: ONNX or TorchScript for deployment (kdad.inference.export).

kdad-export ckpt_path=logs/train/runs/<run> format=onnx                        # <run>/model.onnx
kdad-export ckpt_path=logs/train/runs/<run> format=onnx preprocess=uint8_hwc   # takes RGB pixels
"""

from kdad.engine.hydra import entry_point

main = entry_point("kdad.inference.export:export", "export", __spec__.name)

if __name__ == "__main__":
    main()
