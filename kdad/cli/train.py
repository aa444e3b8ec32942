"""``kdad-train``: fit a variant, fit its thresholds, test it (kdad.engine.run.train).

kdad-train model=stfpm data=mvtec data.category=bottle logger=wandb
kdad-train -m model=rd4ad,stfpm data.category=stripes,checker
kdad-train experiment=demo
kdad-train ckpt_path=last hydra.run.dir=logs/train/runs/<run>   # resume a killed run
"""

from kdad.engine.hydra import entry_point

main = entry_point("kdad.engine.run:train", "train", __spec__.name)

if __name__ == "__main__":
    main()
