//! Wire protocols the enforcer speaks: pure codecs, no I/O, no policy.

pub mod postgres;
