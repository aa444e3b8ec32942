"""``kdad-eval ckpt_path=PATH``: re-test a checkpoint (kdad.engine.run.evaluate).

    kdad-eval ckpt_path=logs/train/runs/X/checkpoints/last.ckpt data=mvtec data.category=bottle

The variant, its weights and its preprocessing come from the checkpoint (``ckpt_path`` may also
be a kdad-train run folder). Naming a model (``model=rd4ad``) checks that the checkpoint is one.
"""

from kdad.engine.hydra import entry_point

main = entry_point("kdad.engine.run:evaluate", "eval", __spec__.name)

if __name__ == "__main__":
    main()
