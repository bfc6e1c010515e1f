pub mod hub;
pub mod postgres;
pub mod s3;
