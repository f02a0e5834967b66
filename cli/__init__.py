"""The bnfold command line (installed as the import package `bnfold_cli`)."""
