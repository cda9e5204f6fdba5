//! Positions (B6): `<topic>:<partition>:<offset>` with the topic name without the environment
//! prefix (docs/contracts.md). Commands return them; queries accept them as `min_position`.

use std::fmt;

use switchboard_runtime::topics::topic_specs;

use crate::error::ApiError;

/// Topics whose positions the read models track, and the projection that records them.
const TRACKED: [(&str, &str); 3] =
    [("config.v1", "read_models"), ("inbound.v1", "sources"), ("outbound.v1", "read_models")];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl fmt::Display for Position {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}:{}:{}", self.topic, self.partition, self.offset)
    }
}

/// The `projector_positions.projection` that tracks `topic`.
pub fn projection_of(topic: &str) -> &'static str {
    TRACKED.iter().find(|(tracked, _)| *tracked == topic).map_or("read_models", |(_, projection)| projection)
}

impl Position {
    pub fn parse(text: &str) -> Result<Position, String> {
        let mut parts = text.trim().split(':');
        let (Some(topic), Some(partition), Some(offset), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("`{text}` is not a position (`<topic>:<partition>:<offset>`)"));
        };
        if !TRACKED.iter().any(|(tracked, _)| *tracked == topic) {
            return Err(format!(
                "topic `{topic}` has no read-model position (use config.v1, inbound.v1 or outbound.v1)"
            ));
        }
        let partitions = topic_specs().iter().find(|spec| spec.base_name == topic).map_or(0, |spec| spec.partitions);
        let partition: i32 = partition
            .parse()
            .ok()
            .filter(|partition| (0..partitions).contains(partition))
            .ok_or_else(|| format!("`{partition}` is not a partition of {topic} (0..{partitions})"))?;
        let offset: i64 =
            offset.parse().ok().filter(|offset| *offset >= 0).ok_or_else(|| format!("`{offset}` is not an offset"))?;
        Ok(Position { topic: topic.to_owned(), partition, offset })
    }

    /// A `min_position` field: empty, or one or more comma-separated positions.
    pub fn parse_list(field: &'static str, text: &str) -> Result<Vec<Position>, ApiError> {
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        text.split(',').map(|part| Position::parse(part).map_err(|problem| ApiError::invalid(field, problem))).collect()
    }

    pub fn join(positions: &[Position]) -> String {
        positions.iter().map(Position::to_string).collect::<Vec<_>>().join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b6_positions_round_trip_and_name_their_projection() {
        let position = Position::parse("inbound.v1:7:1234").unwrap();
        assert_eq!(position, Position { topic: "inbound.v1".into(), partition: 7, offset: 1234 });
        assert_eq!(position.to_string(), "inbound.v1:7:1234");
        assert_eq!(projection_of("inbound.v1"), "sources");
        assert_eq!(projection_of("config.v1"), "read_models");
        // Replies and notes (O1): the projector records outbound.v1 with the read models.
        assert_eq!(projection_of("outbound.v1"), "read_models");
        assert!(Position::parse("outbound.v1:11:3").is_ok());
        let list = Position::parse_list("min_position", "config.v1:1:88,inbound.v1:0:5").unwrap();
        assert_eq!(Position::join(&list), "config.v1:1:88,inbound.v1:0:5");
        assert!(Position::parse_list("min_position", "").unwrap().is_empty());
    }

    #[test]
    fn b6_malformed_positions_are_invalid_arguments() {
        for bad in [
            "x",
            "inbound.v1:7",
            "sb.inbound.v1:1:1",
            "deadletter.v1:0:1",
            "inbound.v1:99:1",
            "inbound.v1:1:-4",
            "inbound.v1:1:1:1",
        ] {
            assert!(Position::parse(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            Position::parse_list("min_position", "inbound.v1:0:1,nope"),
            Err(ApiError::InvalidArgument(_))
        ));
    }
}
