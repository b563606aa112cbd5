"""gradlab inside the tools people already use: TensorBoard (``tensorboard``) and Lightning
(``lightning``). Each module needs its extra (``pip install 'gradlab[tensorboard]'``) and says
so, with that command, when it is missing."""
