//! Domain types, parsed once at the edge into values that cannot be invalid:
//! the buyer's request, the queued order message and the order's state.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// Longest user id the API accepts, in characters.
pub const MAX_USER_ID_CHARS: usize = 64;
/// Longest idempotency key, in characters.
pub const MAX_KEY_CHARS: usize = 128;

/// A request the engine refuses, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidField {
    pub field: &'static str,
    pub message: String,
}

impl InvalidField {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// `Idempotency-Key`: 1–128 characters from `[A-Za-z0-9._~:-]`; also the order id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(raw: &str) -> Result<Self, InvalidField> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || "._~:-".contains(c);
        if raw.is_empty() || raw.len() > MAX_KEY_CHARS || !raw.chars().all(ok_char) {
            return Err(InvalidField::new(
                "Idempotency-Key",
                "Idempotency-Key must be 1-128 characters from [A-Za-z0-9._~:-]",
            ));
        }
        Ok(Self(raw.to_owned()))
    }
    /// A fresh key for a request that brought none.
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A buyer: 1–64 characters, none of them a control character (Unicode
/// category Cc: U+0000–U+001F, U+007F–U+009F). PostgreSQL refuses a NUL in
/// text, and a log or terminal would be at the mercy of the others.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    pub fn parse(raw: &str) -> Result<Self, InvalidField> {
        let chars = raw.chars().count();
        if chars == 0 || chars > MAX_USER_ID_CHARS {
            return Err(InvalidField::new(
                "userId",
                "userId must be a string of 1-64 characters",
            ));
        }
        if raw.chars().any(char::is_control) {
            return Err(InvalidField::new(
                "userId",
                "userId must not contain control characters",
            ));
        }
        Ok(Self(raw.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A product id: a positive integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ProductId(i64);

impl ProductId {
    pub fn new(id: i64) -> Result<Self, InvalidField> {
        if id < 1 {
            return Err(InvalidField::new(
                "productId",
                "productId must be an integer of at least 1",
            ));
        }
        Ok(Self(id))
    }
    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for ProductId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Units in one order: a positive 32-bit integer (the product's
/// `max_per_order` is checked against the catalog, not here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Quantity(i32);

impl Quantity {
    pub fn new(units: i64) -> Result<Self, InvalidField> {
        match i32::try_from(units) {
            Ok(q) if q >= 1 => Ok(Self(q)),
            _ => Err(InvalidField::new(
                "quantity",
                "quantity must be a positive integer",
            )),
        }
    }
    pub fn get(self) -> i32 {
        self.0
    }
}

/// What `POST /buy` carries, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRequest {
    pub user_id: UserId,
    pub product_id: ProductId,
    pub quantity: Quantity,
}

impl OrderRequest {
    /// Parses a `POST /buy` body that names its buyer; the error names the
    /// first bad field.
    pub fn parse(body: &[u8]) -> Result<Self, InvalidField> {
        let body = OrderBody::parse(body)?;
        let user_id = body
            .user_id
            .clone()
            .ok_or_else(|| InvalidField::new("userId", "userId is missing"))?;
        Ok(body.for_buyer(user_id))
    }
}

/// A `POST /buy` body whose `userId` may be left out (a token names the
/// buyer instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderBody {
    pub user_id: Option<UserId>,
    pub product_id: ProductId,
    pub quantity: Quantity,
}

impl OrderBody {
    pub fn parse(body: &[u8]) -> Result<Self, InvalidField> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| InvalidField::new("body", format!("body is not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(InvalidField::new("body", "body must be a JSON object"));
        };
        let user_id = user_field(&map)?;
        let product_id = ProductId::new(integer_field(&map, "productId")?)?;
        let quantity = Quantity::new(integer_field(&map, "quantity")?)?;
        Ok(Self {
            user_id,
            product_id,
            quantity,
        })
    }

    /// The order of `buyer` (the caller checked that the body agrees).
    pub fn for_buyer(self, buyer: UserId) -> OrderRequest {
        OrderRequest {
            user_id: buyer,
            product_id: self.product_id,
            quantity: self.quantity,
        }
    }
}

/// The buyer a body names in `userId`, if any.
fn user_field(map: &serde_json::Map<String, Value>) -> Result<Option<UserId>, InvalidField> {
    match map.get("userId") {
        Some(Value::String(s)) => Ok(Some(UserId::parse(s)?)),
        Some(_) => Err(InvalidField::new("userId", "userId must be a string")),
        None => Ok(None),
    }
}

/// The buyer a pay or cancel body names (`{"userId": …}`); an empty body
/// names none.
pub fn buyer_named(body: &[u8]) -> Result<Option<UserId>, InvalidField> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| InvalidField::new("body", format!("body is not valid JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(InvalidField::new("body", "body must be a JSON object"));
    };
    user_field(&map)
}

fn integer_field(
    map: &serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<i64, InvalidField> {
    match map.get(field) {
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| InvalidField::new(field, format!("{field} must be an integer"))),
        Some(_) => Err(InvalidField::new(
            field,
            format!("{field} must be an integer"),
        )),
        None => Err(InvalidField::new(field, format!("{field} is missing"))),
    }
}

/// The message on `<ns>.orders`: an accepted order waiting to be applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderMessage {
    pub order_id: String,
    pub user_id: String,
    pub product_id: i64,
    pub quantity: i64,
    pub accepted_at: DateTime<Utc>,
}

/// An order message that decoded and validated: what the worker books.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedOrder {
    pub order_id: IdempotencyKey,
    pub user_id: UserId,
    pub product_id: ProductId,
    pub quantity: Quantity,
    pub accepted_at: DateTime<Utc>,
}

impl OrderMessage {
    pub fn new(order_id: &IdempotencyKey, request: &OrderRequest, at: DateTime<Utc>) -> Self {
        Self {
            order_id: order_id.as_str().to_owned(),
            user_id: request.user_id.as_str().to_owned(),
            product_id: request.product_id.get(),
            quantity: i64::from(request.quantity.get()),
            accepted_at: at,
        }
    }

    /// Decodes and validates a message body; the error is why it cannot be booked.
    pub fn decode(body: &[u8]) -> Result<QueuedOrder, String> {
        let m: OrderMessage =
            serde_json::from_slice(body).map_err(|e| format!("undecodable order: {e}"))?;
        let invalid = |e: InvalidField| format!("invalid order: {e}");
        Ok(QueuedOrder {
            order_id: IdempotencyKey::parse(&m.order_id).map_err(invalid)?,
            user_id: UserId::parse(&m.user_id).map_err(invalid)?,
            product_id: ProductId::new(m.product_id).map_err(invalid)?,
            quantity: Quantity::new(m.quantity).map_err(invalid)?,
            accepted_at: m.accepted_at,
        })
    }
}

/// Where an order stands, as `GET /orders/{id}` tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Queued,
    Confirmed,
    Rejected,
    /// Booked for a product with a hold: the units are the buyer's until
    /// `heldUntil`, unless paid.
    Held,
    Paid,
    Cancelled,
    Expired,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Confirmed => "confirmed",
            Self::Rejected => "rejected",
            Self::Held => "held",
            Self::Paid => "paid",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
        }
    }

    /// The status a ledger row holds, by its name there.
    pub fn from_row(status: &str) -> Option<Self> {
        Some(match status {
            "confirmed" => Self::Confirmed,
            "rejected" => Self::Rejected,
            "held" => Self::Held,
            "paid" => Self::Paid,
            "cancelled" => Self::Cancelled,
            "expired" => Self::Expired,
            _ => return None,
        })
    }

    /// Whether the order's units are off the stock: confirmed, held or paid.
    pub fn is_booked(self) -> bool {
        matches!(self, Self::Confirmed | Self::Held | Self::Paid)
    }

    /// Whether nothing will change it any more.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Queued | Self::Held)
    }
}

/// Why the worker rejected an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    SoldOut,
    UnknownProduct,
    PerUserLimit,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SoldOut => "sold_out",
            Self::UnknownProduct => "unknown_product",
            Self::PerUserLimit => "per_user_limit",
        }
    }
}

/// The order as the buyer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderView {
    pub order_id: String,
    pub user_id: String,
    pub product_id: i64,
    pub quantity: i64,
    pub status: OrderStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub accepted_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processed_at: Option<DateTime<Utc>>,
    /// A held order's expiry (kept once paid, cancelled or expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_until: Option<DateTime<Utc>>,
    /// When it was paid, cancelled or expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_at: Option<DateTime<Utc>>,
}

impl OrderView {
    /// Whether this is the order `request` asks for: same buyer, product
    /// and quantity.
    pub fn is_of(&self, request: &OrderRequest) -> bool {
        self.user_id == request.user_id.as_str()
            && self.product_id == request.product_id.get()
            && self.quantity == i64::from(request.quantity.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(body: &str) -> &'static str {
        OrderRequest::parse(body.as_bytes())
            .expect_err("body should be refused")
            .field
    }

    #[test]
    fn parses_a_good_request() {
        let r = OrderRequest::parse(br#"{"userId":"u1","productId":3,"quantity":2}"#)
            .expect("valid request");
        assert_eq!(r.user_id.as_str(), "u1");
        assert_eq!(r.product_id.get(), 3);
        assert_eq!(r.quantity.get(), 2);
    }

    #[test]
    fn names_the_bad_field() {
        assert_eq!(field_of(""), "body");
        assert_eq!(field_of("not json"), "body");
        assert_eq!(field_of("[1,2]"), "body");
        assert_eq!(field_of(r#"{"productId":1,"quantity":1}"#), "userId");
        assert_eq!(
            field_of(r#"{"userId":"","productId":1,"quantity":1}"#),
            "userId"
        );
        for control in ["a\\u0000b", "tab\\there", "\\u007f", "x\\u009fy", "line\\n"] {
            let body = format!(r#"{{"userId":"{control}","productId":1,"quantity":1}}"#);
            assert_eq!(field_of(&body), "userId", "userId {control}");
        }
        assert!(
            UserId::parse("zoë-😀 \u{a0}").is_ok(),
            "printable non-ASCII is fine"
        );
        let long = "x".repeat(65);
        assert_eq!(
            field_of(&format!(
                r#"{{"userId":"{long}","productId":1,"quantity":1}}"#
            )),
            "userId"
        );
        assert_eq!(
            field_of(r#"{"userId":"u","productId":0,"quantity":1}"#),
            "productId"
        );
        assert_eq!(
            field_of(r#"{"userId":"u","productId":"1","quantity":1}"#),
            "productId"
        );
        for q in ["-5", "0", "1.5", "\"abc\"", "10000000000", "null"] {
            let body = format!(r#"{{"userId":"u","productId":1,"quantity":{q}}}"#);
            assert_eq!(field_of(&body), "quantity", "quantity {q}");
        }
    }

    #[test]
    fn keys_follow_the_contract() {
        assert!(IdempotencyKey::parse("abc-DEF_1.2~3:4").is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(128)).is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(129)).is_err());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse("has space").is_err());
        assert!(IdempotencyKey::parse("slash/").is_err());
    }

    #[test]
    fn decodes_only_valid_messages() {
        let good = br#"{"orderId":"k1","userId":"u","productId":1,"quantity":1,"acceptedAt":"2026-01-01T00:00:00Z"}"#;
        assert!(OrderMessage::decode(good).is_ok());
        assert!(OrderMessage::decode(b"garbage").is_err());
        let nul_user = br#"{"orderId":"k1","userId":"a\u0000b","productId":1,"quantity":1,"acceptedAt":"2026-01-01T00:00:00Z"}"#;
        assert!(OrderMessage::decode(nul_user).is_err());
        let bad_qty = br#"{"orderId":"k1","userId":"u","productId":1,"quantity":0,"acceptedAt":"2026-01-01T00:00:00Z"}"#;
        assert!(OrderMessage::decode(bad_qty).is_err());
    }
}
