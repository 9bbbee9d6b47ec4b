"""The bottom layer every other part of fedpriv imports: errors, the run config, the message contract.

Nothing here imports another fedpriv package (the import contract in ``pyproject.toml``
checks it), so a ClientApp, a ServerApp and the command line agree on these without
pulling each other in.
"""
