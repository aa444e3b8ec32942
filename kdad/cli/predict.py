"""``kdad-predict ckpt_path=PATH input=PATH``: score images (kdad.inference.predict).

kdad-predict ckpt_path=logs/train/runs/<run> input=/line7/today
kdad-predict ckpt_path=logs/train/runs/<run> input='/line7/*/cam2_*.png' device=cuda
"""

from kdad.engine.hydra import entry_point

main = entry_point("kdad.inference.predict:predict", "predict", __spec__.name)

if __name__ == "__main__":
    main()
