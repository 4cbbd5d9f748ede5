"""TensorRT-LLM side of magpie-parity: checkpoint conversion, engine build commands, benchmark data.

Nothing in this package imports TensorRT-LLM: conversion and the round trip run anywhere; only
:func:`trt.build.run_build` needs ``trtllm-build`` on the PATH.
"""
