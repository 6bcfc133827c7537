-- Holds: a product with hold_seconds books its orders as `held` until
-- held_until; then exactly one of `paid` (POST /orders/{id}/pay), `cancelled`
-- (POST /orders/{id}/cancel, units back at once) or `expired` (the workers'
-- sweep, units back within 2 s). NULL keeps a booked order `confirmed`.
ALTER TABLE products ADD COLUMN IF NOT EXISTS hold_seconds integer CHECK (hold_seconds > 0);

ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_status_check;
ALTER TABLE orders ADD CONSTRAINT orders_status_check
    CHECK (status IN ('confirmed', 'rejected', 'held', 'paid', 'cancelled', 'expired'));
ALTER TABLE orders ADD COLUMN IF NOT EXISTS held_until timestamptz;
ALTER TABLE orders ADD COLUMN IF NOT EXISTS settled_at timestamptz;

-- The units a buyer has (per-user limit) count held and paid orders too.
CREATE INDEX IF NOT EXISTS orders_product_user_booked
    ON orders (product_id, user_id) WHERE status IN ('confirmed', 'held', 'paid');
-- The sweep: held orders by their expiry.
CREATE INDEX IF NOT EXISTS orders_held_until ON orders (held_until) WHERE status = 'held';
