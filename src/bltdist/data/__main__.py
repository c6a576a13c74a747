"""``python -m bltdist.data prepare``: the data tools (``bltdist.data.cli``)."""

from bltdist.data.cli import main

if __name__ == "__main__":
    main()
