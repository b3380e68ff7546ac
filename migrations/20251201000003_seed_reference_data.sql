-- A small, realistic seed: part of the Dubai fleet, one staff account per role, drivers, the
-- additional-services catalogue and the sales pipeline with its Kommo mapping. Fixed ids so that
-- demo scripts and the API examples can name them.

INSERT INTO staff_accounts (id, full_name, email, phone, role, external_crm_id) VALUES
    ('00000000-0000-4000-a000-000000000001', 'Amira Haddad',   'ceo@skyluxse.ae',        '+971500000001', 'ceo',         NULL),
    ('00000000-0000-4000-a000-000000000002', 'Omar Farouk',    'ops@skyluxse.ae',        '+971500000002', 'operations',  NULL),
    ('00000000-0000-4000-a000-000000000003', 'Lina Petrova',   'sales@skyluxse.ae',      '+971500000003', 'sales',       '10450001'),
    ('00000000-0000-4000-a000-000000000004', 'Rashid Khan',    'driver1@skyluxse.ae',    '+971500000004', 'driver',      NULL),
    ('00000000-0000-4000-a000-000000000005', 'Joseph Mensah',  'driver2@skyluxse.ae',    '+971500000005', 'driver',      NULL),
    ('00000000-0000-4000-a000-000000000006', 'Kommo Sync',     'integration@skyluxse.ae', NULL,           'integration', NULL);

INSERT INTO driver_profiles (id, staff_account_id, status, experience_years, languages) VALUES
    ('00000000-0000-4000-b000-000000000004', '00000000-0000-4000-a000-000000000004', 'available', 9, '{en,ar,ur}'),
    ('00000000-0000-4000-b000-000000000005', '00000000-0000-4000-a000-000000000005', 'available', 6, '{en,fr}');

INSERT INTO vehicles (id, external_ref, name, make, model, year, vin, plate_number, class, segment, body_style,
                      seating_capacity, power_hp, exterior_color, interior_color, mileage_km, location,
                      zoho_item_id, rental_prices) VALUES
    ('00000000-0000-4000-c000-000000000001', 'SLX-001', 'Rolls-Royce Ghost', 'Rolls-Royce', 'Ghost', 2024,
     'SCA664S05RUX00001', 'Dubai P 10101', 'ultra-luxury', 'Sedan', 'sedan', 5, 563, 'Arctic White', 'Mandarin',
     12400, 'Downtown Dubai', '4150868000000100001', '{"daily": 6500, "weekly": 39000, "monthly": 140000}'),
    ('00000000-0000-4000-c000-000000000002', 'SLX-002', 'Rolls-Royce Cullinan', 'Rolls-Royce', 'Cullinan', 2023,
     'SLATV4C07PU200002', 'Dubai Q 20202', 'ultra-luxury', 'SUV', 'suv', 5, 563, 'Black Diamond', 'Seashell',
     21800, 'Dubai Marina', '4150868000000100002', '{"daily": 7500, "weekly": 45000, "monthly": 160000}'),
    ('00000000-0000-4000-c000-000000000003', 'SLX-003', 'Lamborghini Urus', 'Lamborghini', 'Urus S', 2024,
     'ZPBUB3ZL0RLA00003', 'Dubai R 30303', 'supercar', 'SUV', 'suv', 5, 657, 'Giallo Auge', 'Nero Ade',
     8300, 'Business Bay', '4150868000000100003', '{"daily": 4500, "weekly": 27000, "monthly": 95000}'),
    ('00000000-0000-4000-c000-000000000004', 'SLX-004', 'Lamborghini Huracan EVO Spyder', 'Lamborghini', 'Huracan EVO Spyder', 2023,
     'ZHWUT5ZF1PLA00004', 'Dubai S 40404', 'supercar', 'Convertible', 'convertible', 2, 631, 'Verde Mantis', 'Nero',
     15100, 'Palm Jumeirah', '4150868000000100004', '{"daily": 4200, "weekly": 25000, "monthly": 90000}'),
    ('00000000-0000-4000-c000-000000000005', 'SLX-005', 'Mercedes-Benz G 63 AMG', 'Mercedes-Benz', 'G 63 AMG', 2024,
     'W1NYC7HJ0RX000005', 'Dubai T 50505', 'luxury', 'SUV', 'suv', 5, 577, 'Obsidian Black', 'Macchiato',
     9800, 'Jumeirah', '4150868000000100005', '{"daily": 2800, "weekly": 16800, "monthly": 60000}'),
    ('00000000-0000-4000-c000-000000000006', 'SLX-006', 'Ferrari 296 GTB', 'Ferrari', '296 GTB', 2024,
     'ZFF99SLA0R0000006', 'Dubai U 60606', 'supercar', 'Coupe', 'coupe', 2, 819, 'Rosso Corsa', 'Cuoio',
     4600, 'DIFC', '4150868000000100006', '{"daily": 5200, "weekly": 31000, "monthly": 110000}');

INSERT INTO additional_services (id, name, description, default_price) VALUES
    ('00000000-0000-4000-d000-000000000001', 'Child Seat', 'ISOFIX child seat, fitted on delivery', 150.00),
    ('00000000-0000-4000-d000-000000000002', 'Portable Wi-Fi', 'Unlimited 5G hotspot', 100.00),
    ('00000000-0000-4000-d000-000000000003', 'Additional Driver', 'A second insured driver', 300.00),
    ('00000000-0000-4000-d000-000000000004', 'Airport Delivery', 'Delivery to DXB or DWC arrivals', 500.00),
    ('00000000-0000-4000-d000-000000000005', 'Photo Shoot', 'One hour with a photographer and the car', 1500.00);

INSERT INTO sales_pipeline_stages (id, name, probability, sla_days, kommo_pipeline_id, kommo_status_id, booking_status, order_index) VALUES
    ('new',         'New enquiry',      0.10, 1, '5389528', '47873530', NULL,        1),
    ('qualified',   'Qualified',        0.30, 2, '5389528', '47873533', NULL,        2),
    ('offer_sent',  'Offer sent',       0.50, 3, '5389528', '47873536', NULL,        3),
    ('negotiation', 'Negotiation',      0.70, 5, '5389528', '47873539', NULL,        4),
    ('deposit',     'Deposit received', 0.90, 2, '5389528', '47888833', 'confirmed', 5),
    ('won',         'Won',              1.00, 0, '5389528', '142',      'lead',      6),
    ('lost',        'Lost',             0.00, 0, '5389528', '143',      NULL,        7);

INSERT INTO kommo_pipeline_stages (id, label, group_name, header_color, booking_status, order_index) VALUES
    ('47873530', 'Incoming leads',   'sales',      '#99ccff', NULL,          1),
    ('47873533', 'Qualified',        'sales',      '#ffff99', NULL,          2),
    ('47873536', 'Offer sent',       'sales',      '#ffcc66', NULL,          3),
    ('47873539', 'Negotiation',      'sales',      '#ff9966', NULL,          4),
    ('47888833', 'Deposit received', 'sales',      '#ccff99', 'confirmed',   5),
    ('47888836', 'Car delivered',    'operations', '#99ff99', 'delivery',    6),
    ('47888839', 'On rent',          'operations', '#66ff99', 'in_progress', 7),
    ('142',      'Closed - won',     'closed',     '#ccff66', 'completed',   8),
    ('143',      'Closed - lost',    'closed',     '#d5d8db', 'cancelled',   9);

INSERT INTO system_settings (key, value, description) VALUES
    ('currency', '"AED"', 'Default currency of money amounts'),
    ('timezone', '"Asia/Dubai"', 'Operating time zone of the business day (KPIs, SLAs)'),
    ('delivery_sla_minutes', '30', 'Grace after promised_at before a delivery counts as late');
