"""``python -m bltdist.patch {calibrate,precompute,stats}``: the entropy patching tools (``bltdist.patching.cli``)."""

from bltdist.patching.cli import main

if __name__ == "__main__":
    main()
