"""Pure tensor math: logprobs, masking and whitening, KL estimators and controllers, GAE.

Submodules are not imported here so that `import tether.ops.masking` stays cheap.
"""
