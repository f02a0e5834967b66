"""python -m bnfold: the same app as the `bnfold` console script."""

from bnfold_cli.app import main

if __name__ == "__main__":
    main()
