"""The maths of compression as pure functions: channel selection and structural surgery, masks, quantizers."""
