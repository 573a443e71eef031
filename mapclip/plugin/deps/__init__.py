"""Missing dependencies: find them, say so, install them on request, check the result.

The engine needs torch, open_clip and rasterio (plus a few smaller packages)
in QGIS's own Python. When one cannot be found the plugin still loads, shows a
message-bar warning naming what is missing, and offers to install them with
pip into a plugin-owned folder, ``<QGIS profile>/python/mapclip-deps``.

How the folder stays consistent with QGIS:

- It goes to the **front** of ``sys.path``, so its copies win over older system
  copies (Debian's sympy 1.11 in ``/usr/lib/python3/dist-packages`` breaks
  torch's ``from sympy.core.numbers import equal_valued``).
- QGIS's own packages are **never** taken from it: ``pip install --target``
  installs every dependency, so after pip the installer deletes NumPy, GDAL
  (``osgeo``), PyQt5, sip and qgis from the folder (:data:`PROTECTED`), and
  :func:`add_deps_path` does the same for a folder left by an older installer.
- pip resolves against QGIS's **exact** NumPy version (``numpy==1.24.2`` on
  Debian 12), so every package it picks accepts the NumPy that QGIS and GDAL
  are built against. The exact pins of ``requirements.txt`` are kept for
  torch, torchvision and open_clip; the others become upper bounds
  (``faiss-cpu<=1.15.1``), so pip takes the tested release where QGIS's NumPy
  allows it and the newest older one otherwise.

The torch build is chosen honestly: the CPU build is pinned with its local
version (``torch==2.14.1+cpu``), which only the PyTorch CPU index has, so when
that index cannot be reached pip fails with a clear message instead of quietly
taking the default index's CUDA build (6 GB with triton and the nvidia
wheels). After pip, the installer reads which build it really installed
(``torch/version.py``) and imports the engine in a subprocess with the
``sys.path`` QGIS will have (the folder first), and names the module, the
error and a fix when that fails.

pip runs in a QProcess; its output drives a progress signal carrying
``(fraction or -1, text)``: bytes downloaded of the sizes pip has announced,
and the package being downloaded.

The modules, from the bottom up:

- ``folder``: where the folder is, what is in it, QGIS's packages pruned from it.
- ``missing``: what is missing (no import), and the message naming it.
- ``plan``: the pip command: requirements, NumPy pin, torch build and index.
- ``verify``: which torch was installed; the import check in a subprocess; diagnoses.
- ``failures``: a failed pip run explained (proxy, network, permissions, disk).
- ``progress``: progress from pip's output.
- ``activate``: the folder put first on sys.path (start-up, after an install).
- ``installer``: pip in a QProcess, the check after it, the message-bar offer.
"""
