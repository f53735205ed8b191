//! `layerfs build`: Containerfile parsing, and later the build itself.
//!
//! - `dockerfile/`: a Dockerfile/Containerfile into stages of typed instructions, environment
//!   replacement, stage references and the predefined ARGs; pure, no I/O.

pub mod dockerfile;
