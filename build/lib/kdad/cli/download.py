"""``kdad-download data=mvtec data.root=PATH``: fetch and verify a dataset (kdad.data.download).

kdad-download data=mvtec data.root=~/data/mvtec
kdad-download data=btad data.root=~/data/btad archive=/downloads/BTech_Dataset_transformed.zip
"""

from kdad.data.download import download
from kdad.engine.hydra import entry_point

main = entry_point(download, "download", __spec__.name)

if __name__ == "__main__":
    main()
