"""``kdad-download data=mvtec|btad [data.root=PATH]``: fetch and verify a dataset (kdad.data.download).

kdad-download data=mvtec data.root=$HOME/data/mvtec
kdad-download data=btad data.root=$HOME/data/btad archive=$HOME/Downloads/btad.zip   # a copy you have
kdad-train data=mvtec data.download=true   # the same, before training

``data.download`` is a key of conf/data/mvtec.yaml and btad.yaml (false by default): set it
as above, without ``+`` (Hydra refuses to add a key that exists).
"""

from kdad.engine.hydra import entry_point

main = entry_point("kdad.data.download:download", "download", __spec__.name)

if __name__ == "__main__":
    main()
